"""Train a bundled tiny model: python scripts/train_tiny.py {dit,unet,classifier} --minutes N [--resume]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.tinymodels.train import main  # noqa: E402

if __name__ == "__main__":
    main()
