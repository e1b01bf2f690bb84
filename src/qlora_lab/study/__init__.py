"""Studies: research configs that re-run with one command and check themselves (`qlora-lab reproduce`), and the
re-execution of one recorded run (`qlora-lab rerun`).

A study is a folder `experiments/<name>/`: `study.yaml` (the question, the train.py runs that answer it, composed
from conf/ like any command, the table's rows and columns with a tolerance each, the plots), a README and the
committed results per scale (`results/<scale>/table.csv`, `table.md`, `runs.json`, the plots).
"""
