"""The trainer runs, checkpoints and resumes (a few seconds of training, not a quality test)."""
import json

from cachekit.tinymodels.bundled import _load_into
from cachekit.tinymodels.classifier import ShapeClassifier
from cachekit.tinymodels.train import train


def test_train_checkpoint_and_resume(tmp_path):
    first = train("classifier", minutes=0.05, out=tmp_path)
    assert first["steps"] > 0 and (tmp_path / "classifier.ckpt.pt").exists()
    second = train("classifier", minutes=0.05, out=tmp_path, resume=True)
    assert second["steps"] > first["steps"]
    assert json.loads((tmp_path / "classifier.train.json").read_text())["steps"] == second["steps"]
    _load_into(ShapeClassifier(), tmp_path / "classifier.safetensors")    # loadable fp16 weights


def test_resume_from_shipped_weights_without_a_checkpoint(tmp_path):
    train("classifier", minutes=0.05, out=tmp_path)
    (tmp_path / "classifier.ckpt.pt").unlink()
    before = json.loads((tmp_path / "classifier.train.json").read_text())["steps"]
    after = train("classifier", minutes=0.05, out=tmp_path, resume=True)
    assert after["steps"] > before
