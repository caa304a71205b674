"""Run by ComfyUI-Manager after cloning: installs the pack's light requirements into ComfyUI's
Python. It never installs or upgrades torch (ComfyUI's own build must stay as it is)."""
import subprocess
import sys
from pathlib import Path

requirements = Path(__file__).with_name("requirements.txt")
subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", str(requirements)])
