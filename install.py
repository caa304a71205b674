"""Run by ComfyUI-Manager after cloning (`python install.py`): installs the pack's light
requirements into ComfyUI's Python. It never installs or upgrades torch (ComfyUI's own build must
stay as it is). A script only: importing it does nothing, and `pip install .` does not ship it."""
import subprocess
import sys
from pathlib import Path


def main() -> None:
    requirements = Path(__file__).with_name("requirements.txt")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", str(requirements)])


if __name__ == "__main__":
    main()
