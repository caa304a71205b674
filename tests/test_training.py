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


def test_min_snr_weights_cap_only_the_nearly_clean_timesteps():
    import torch
    from diffusers import DDPMScheduler
    from cachekit.tinymodels.train import min_snr_weights
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = torch.tensor([5, 50, 200, 600, 999])
    weights = min_snr_weights(alphas[t], 5.0)
    snr = alphas[t] / (1 - alphas[t])
    assert torch.allclose(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))   # noisy steps keep weight 1
    assert (weights[snr > 5] < 1).all() and weights[0] < weights[1]              # cleaner steps count less
    assert torch.equal(min_snr_weights(alphas[t], None), torch.ones(5))


def test_lr_factor_anneals_only_the_last_fraction():
    from cachekit.tinymodels.train import lr_factor
    assert lr_factor(0.5, 0.3) == 1.0 and lr_factor(0.9, 0.0) == 1.0
    assert 0.1 < lr_factor(0.85, 0.3) < lr_factor(0.75, 0.3) < 1.0
    assert abs(lr_factor(1.0, 0.3) - 0.1) < 1e-9 and abs(lr_factor(1.5, 0.3) - 0.1) < 1e-9


def test_teacher_batches_come_from_a_worker(tmp_path):
    record = train("dit", minutes=0.15, out=tmp_path, teacher="unet", min_snr=5.0, lr_decay=0.5)
    assert record["steps"] > 0 and record["teacher_steps"] == record["steps"]
    assert record["min_snr"] == 5.0 and record["lr_decay"] == 0.5
