"""qlora-lab's Hydra launcher (`hydra/launcher=qlab`, the default): see launcher.py."""
