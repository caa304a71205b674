"""Start the CacheKit preview panel: python scripts/panel.py [--host 127.0.0.1] [--port 7860]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import load_pack  # noqa: E402

load_pack()
from cachekit.panel.app import main  # noqa: E402

if __name__ == "__main__":
    main()
