"""Grade the bundled tiny models and write their model card: python scripts/evaluate_tiny.py [dit] [unet]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.tinymodels.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
