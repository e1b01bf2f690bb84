"""Files the package ships."""

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
TINY_DATA = ASSET_DIR / "tiny_tasks.jsonl"
SHIPPED_CONFIGS = ASSET_DIR / "configs"  # architecture configs of the hub presets: planning needs no download
