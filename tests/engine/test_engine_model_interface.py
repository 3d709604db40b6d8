"""The engine's model interface, with a tiny student-teacher model written here: cached teacher
features beside the images, per-step schedules, batch-size limits and calibration on held-out
good images."""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import CATEGORIES, build_model, make_engine
from torch import nn

from defectscope.data import DataError
from defectscope.models.base import AnomalyModel


class TinyStudent(AnomalyModel):
    """A 1x1-conv student regressing the frozen backbone's last feature map from the images."""

    name = "tinystudent"
    train_on_images_and_features = True
    min_batch_size = 1
    max_batch_size = 1
    batch_size_reason = "as its reference"
    scheduler_interval = "step"

    def __init__(self, image_size=64):
        super().__init__(backbone="efficientnet_lite0", image_size=image_size)
        self.channels = self.feature_extractor.channels[-1]
        self.student = nn.Conv2d(3, self.channels, kernel_size=1)
        self.register_buffer("scale", torch.tensor(1.0))
        self.calls = {"steps": [], "calibrated": 0, "steps_per_epoch": None}

    def feature_params(self):
        return {}

    def fit_feature_statistics(self, features):
        self.calls["statistics"] = features.shape

    @torch.no_grad()
    def extract_features(self, images):
        return list(self.feature_extractor(images).values())[-1]

    def _student(self, images, size):
        return nn.functional.adaptive_avg_pool2d(self.student(images), size)

    def training_step_images(self, images, features):
        self.calls["steps"].append((images.shape, features.shape))
        return ((self._student(images, features.shape[-2:]) - features) ** 2).mean()

    def configure_optimizers(self, max_epochs, steps_per_epoch=None):
        self.calls["steps_per_epoch"] = steps_per_epoch
        optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def calibrate(self, batches):
        maps = [self(images)[0] for images in batches]
        self.calls["calibrated"] = sum(len(m) for m in maps)
        self.scale.fill_(torch.cat(maps).max())

    def forward(self, images):
        teacher = self.extract_features(images)
        diff = ((self._student(images, teacher.shape[-2:]) - teacher) ** 2).mean(1, keepdim=True)
        maps = nn.functional.interpolate(diff, size=self.image_size, mode="bilinear") / self.scale
        return maps, maps.amax(dim=(1, 2, 3))


def test_student_sees_images_with_cached_teacher_features_and_steps_its_schedule(splits, tmp_path):
    train = splits[CATEGORIES[0]].train  # 8 good images: 6 train, 2 held out
    torch.manual_seed(0)
    model = TinyStudent()
    engine = make_engine(tmp_path, "tiny", max_epochs=2, batch_size=1)
    engine.fit(model, train)
    steps = model.calls["steps"]
    assert len(steps) == 2 * 6 and model.calls["steps_per_epoch"] == 6
    images_shape, features_shape = steps[0]
    assert images_shape == (1, 3, 64, 64) and features_shape[0] == 1 and features_shape[1] == model.channels
    # Stepped after every optimizer step: 12 halvings of 0.01.
    state = torch.load(engine.model_dir / "last.ckpt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 12
    # Calibrated on the 2 held-out good images, before the threshold was set on them.
    assert model.calls["calibrated"] == 2
    assert float(model.threshold) > 0 and model.threshold_info["n_good"] == 2


def test_batch_sizes_a_model_cannot_train_at_are_refused(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    with pytest.raises(DataError, match=r"tinystudent trains at batch size exactly 1 \(as its reference\); got 4.*--batch-size 1"):
        make_engine(tmp_path, "b4", batch_size=4).fit(TinyStudent(), train)
    with pytest.raises(DataError, match=r"supersimplenet trains at batch size at least 2; got 1.*--batch-size 2"):
        make_engine(tmp_path, "b1", batch_size=1).fit(build_model(), train)


class CountingStudent(TinyStudent):
    """TinyStudent whose calibrate returns the calibrated scores (one pass), counting forwards."""

    name = "countingstudent"

    def forward(self, images):
        self.calls["forward_images"] = self.calls.get("forward_images", 0) + len(images)
        return super().forward(images)

    def calibrate(self, batches):
        batches = list(batches)
        raw = torch.cat([super(CountingStudent, self).forward(b)[1] for b in batches])
        self.calls["calibrated"] = len(raw)
        self.scale.fill_(raw.max())
        scores = raw / self.scale
        return scores, scores


def test_held_out_images_are_scored_once_when_calibrate_returns_their_scores(splits, tmp_path):
    from defectscope.metrics.threshold import fit_threshold

    train = splits[CATEGORIES[0]].train  # 6 trained, 2 held out
    torch.manual_seed(0)
    model = CountingStudent()
    engine = make_engine(tmp_path, "once", max_epochs=1, batch_size=1)
    engine.fit(model, train)
    assert model.calls["calibrated"] == 2
    assert model.calls.get("forward_images", 0) == 0  # no second scoring pass
    # The threshold is the rule applied to forward's scores of the held-out images.
    held_out = [s for s in train if str(s.path) in model.data_info["validation_images"]]
    from defectscope.data.dataset import AnomalyDataset

    images = torch.stack([AnomalyDataset(held_out, image_size=model.image_size, mean=model.mean,
                                         std=model.std)[i]["image"] for i in range(len(held_out))])
    with torch.no_grad():
        scores = model(images)[1].numpy()
    expected = fit_threshold([0] * len(scores), scores, max_false_reject=engine.max_false_reject)
    assert float(model.threshold) == pytest.approx(expected["threshold"], rel=1e-6)
    assert model.pixel_threshold == pytest.approx(expected["threshold"], rel=1e-6)


def test_pixel_threshold_comes_from_held_out_map_maxima_and_is_saved(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    torch.manual_seed(0)
    model = TinyStudent()
    engine = make_engine(tmp_path, "pix", max_epochs=1, batch_size=1)
    engine.fit(model, train)
    assert model.pixel_threshold is not None and model.pixel_threshold_info["n_good"] == 2
    assert "held-out" in model.pixel_threshold_info["source"]
    loaded = TinyStudent()
    loaded.load_from_path(engine.model_dir)
    assert loaded.pixel_threshold == pytest.approx(model.pixel_threshold)
    assert loaded.pixel_threshold_info == model.pixel_threshold_info


class SelectingStudent(TinyStudent):
    """TinyStudent with a constant learning rate (its weights change every epoch) whose validation
    loss follows ``script``, one value per check, recording its student weights at each check."""

    name = "selectingstudent"

    def __init__(self, script):
        super().__init__()
        self.script = list(script)
        self.checked = []

    def configure_optimizers(self, max_epochs, steps_per_epoch=None):
        optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def training_step_images(self, images, features):
        # Random noise from torch's global generator, as augmentations draw it: measuring the
        # validation loss must not change this stream.
        return super().training_step_images(images + 0.1 * torch.randn_like(images), features)

    def validation_loss(self, images):
        assert not self.training and not torch.is_grad_enabled()
        self.checked.append({k: v.clone() for k, v in self.student.state_dict().items()})
        return torch.full((len(images),), float(self.script[len(self.checked) - 1]))


# 25 epochs: checked every ceil(25 / 20) = 2 epochs and after the last one.
SELECT_EPOCHS = 25
CHECKED_EPOCHS = [*range(2, SELECT_EPOCHS, 2), SELECT_EPOCHS]
SCRIPT = [9, 8, 7, 6, 2, 5, 3, 4, 4, 6, 7, 8, 9]  # lowest at the 5th check: epoch 10


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_epoch_with_the_lowest_validation_loss_is_kept(splits, tmp_path, capsys):
    train = splits[CATEGORIES[0]].train  # 6 trained, 2 held out
    torch.manual_seed(0)
    model = SelectingStudent(SCRIPT)
    make_engine(tmp_path, "select", max_epochs=SELECT_EPOCHS, batch_size=1).fit(model, train)
    assert len(model.checked) == len(CHECKED_EPOCHS)
    best = SCRIPT.index(min(SCRIPT))
    assert model.training_info["selected_epoch"] == CHECKED_EPOCHS[best] == 10
    assert model.training_info["validation_loss"] == {str(e): float(v) for e, v in zip(CHECKED_EPOCHS, SCRIPT)}
    assert _same_weights(model.student.state_dict(), model.checked[best])
    assert not _same_weights(model.checked[best], model.checked[-1])  # the last epoch's weights were others
    assert "Kept the weights of epoch 10 of 25" in capsys.readouterr().out
    # The threshold was set on the kept weights: the held-out images scored by them again.
    held_out = [s for s in train if str(s.path) in model.data_info["validation_images"]]
    from defectscope.data.dataset import AnomalyDataset

    images = torch.stack([AnomalyDataset(held_out, image_size=model.image_size, mean=model.mean,
                                         std=model.std)[i]["image"] for i in range(len(held_out))])
    with torch.no_grad():
        assert float(model.threshold) >= float(model(images)[1].max()) * (1 - 1e-6)


def test_select_epoch_last_keeps_the_last_weights_and_measures_nothing(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    torch.manual_seed(0)
    model = SelectingStudent(SCRIPT)
    reference = SelectingStudent(SCRIPT)
    reference.load_state_dict(model.state_dict())
    make_engine(tmp_path, "last", max_epochs=SELECT_EPOCHS, batch_size=1, select_epoch="last").fit(model, train)
    assert model.checked == [] and "selected_epoch" not in model.training_info
    # The same training measured (same random stream): its last check holds the weights the
    # 'last' run kept.
    make_engine(tmp_path, "measured", max_epochs=SELECT_EPOCHS, batch_size=1).fit(reference, train)
    assert _same_weights(model.student.state_dict(), reference.checked[-1])
    with pytest.raises(ValueError, match="select_epoch must be one of validation, last"):
        make_engine(tmp_path, "bad", select_epoch="best")


def test_an_interrupted_run_resumes_with_its_best_epoch_so_far(splits, tmp_path):
    train = splits[CATEGORIES[0]].train
    stop_after = 13  # epoch index: 14 epochs done, 7 checks (the best, epoch 10, among them)

    def interrupt(epoch, loss):
        if epoch == stop_after:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    first = SelectingStudent(SCRIPT)
    with pytest.raises(KeyboardInterrupt):
        make_engine(tmp_path, "resume", max_epochs=SELECT_EPOCHS, batch_size=1, on_epoch_end=interrupt).fit(first, train)
    assert len(first.checked) == 7
    torch.manual_seed(1)
    second = SelectingStudent(SCRIPT[7:])  # the rest of the checks
    make_engine(tmp_path, "resume", max_epochs=SELECT_EPOCHS, batch_size=1).fit(second, train)
    assert len(second.checked) == len(CHECKED_EPOCHS) - 7
    assert second.training_info["selected_epoch"] == 10
    assert second.training_info["validation_loss"] == {str(e): float(v) for e, v in zip(CHECKED_EPOCHS, SCRIPT)}
    assert _same_weights(second.student.state_dict(), first.checked[4])
