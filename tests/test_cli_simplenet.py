"""``defectscope simplenet ... net ... dataset ...`` and ``defectscope train --model simplenet``."""

from __future__ import annotations

import json

import pytest
import torch
from _cli_helpers import in_tmp_dir, read_csv, run_cli, single_thread  # noqa: F401 (fixtures)

from defectscope import cli_simplenet
from defectscope.data import make_synthetic_mvtec

FAST_NET = ["net", "-b", "efficientnet_lite0", "--pretrain_embed_dimension", 64, "--target_embed_dimension", 64,
            "--pre_proj", 1, "--embedding_size", 64]
FAST_DATA = ["--batch_size", 4, "--num_workers", 0, "--resize", 72, "--imagesize", 64]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sn_cli_data")
    for i, category in enumerate(("fabric", "wood")):
        make_synthetic_mvtec(root, category=category, image_size=64, n_train=6, n_test_good=3, n_test_defect=3,
                             seed=i)
    return root


@pytest.fixture(scope="module")
def two_subdatasets(tmp_path_factory, data_root):
    """The seed's command with two subdatasets (one positional, one with -d) and overlays."""
    results = tmp_path_factory.mktemp("sn_cli_run")
    argv = ["simplenet", "--results_path", results, "--log_project", "proj", "--log_group", "grp", "--run_name", "run",
            "--seed", 3, "--save_segmentation_images", "--no_progress", *FAST_NET, "--meta_epochs", 2,
            "--gan_epochs", 2, "dataset", *FAST_DATA, "-d", "wood", "mvtec", data_root, "fabric"]
    code = run_cli(argv)
    return dict(code=code, run_dir=results / "proj" / "grp" / "run", argv=argv)


# ---- parsing ---------------------------------------------------------------------------------------------
def test_every_seed_option_is_accepted_with_the_reference_default():
    parsed = cli_simplenet.parse(["net", "dataset", "mvtec", "data", "bottle"])
    main_opts, net, data = vars(parsed["main"]), vars(parsed["net"]), vars(parsed["dataset"])
    assert {k: main_opts[k] for k in ("gpu", "seed", "log_group", "log_project", "run_name", "test",
                                       "save_segmentation_images")} == dict(
        gpu=None, seed=0, log_group="group", log_project="project", run_name="test", test=False,
        save_segmentation_images=False)  # gpu None means [0]
    assert {k: net[k] for k in ("backbone_names", "layers_to_extract_from", "pretrain_embed_dimension",
                                "target_embed_dimension", "patchsize", "embedding_size", "meta_epochs",
                                "aed_meta_epochs", "gan_epochs", "dsc_layers", "dsc_hidden", "noise_std",
                                "dsc_margin", "dsc_lr", "auto_noise", "train_backbone", "cos_lr", "pre_proj",
                                "proj_layer_type", "mix_noise")} == dict(
        backbone_names=None, layers_to_extract_from=None, pretrain_embed_dimension=384,
        target_embed_dimension=384, patchsize=3, embedding_size=None, meta_epochs=1, aed_meta_epochs=1,
        gan_epochs=1, dsc_layers=2, dsc_hidden=None, noise_std=None, dsc_margin=0.8, dsc_lr=0.0002, auto_noise=0,
        train_backbone=False, cos_lr=False, pre_proj=0, proj_layer_type=0, mix_noise=1)
    assert {k: data[k] for k in ("name", "data_path", "subdataset", "batch_size", "resize", "imagesize",
                                 "num_workers", "rotate_degrees", "translate", "scale", "brightness", "contrast",
                                 "saturation", "gray", "hflip", "vflip", "augment")} == dict(
        name="mvtec", data_path="data", subdataset=["bottle"], batch_size=2, resize=256, imagesize=224,
        num_workers=2, rotate_degrees=0, translate=0, scale=0, brightness=0, contrast=0, saturation=0, gray=0,
        hflip=0, vflip=0, augment=False)


@pytest.mark.parametrize("options, standardized, noise_std", [
    ([], True, 1.0),  # default: 1.0 feature stds (the reference's 0.05 is too little there)
    (["--noise_std", "0.3"], True, 0.3),
    (["--absolute_noise"], False, 0.05),  # the reference: 0.05 in absolute feature units
    (["--absolute_noise", "--noise_std", "0.015"], False, 0.015),
])
def test_noise_std_default_and_absolute_noise(options, standardized, noise_std):
    from defectscope.models import SimpleNet

    parsed = cli_simplenet.parse(["net", *options, "dataset", "mvtec", "data", "bottle"])
    kwargs = cli_simplenet.model_kwargs(parsed["net"], parsed["dataset"])
    assert kwargs["standardize_features"] is standardized
    model = SimpleNet(**{**kwargs, "backbone": "efficientnet_lite0", "pretrained": False, "resize": 64,
                         "imagesize": 64, "pretrain_embed_dimension": 8, "target_embed_dimension": 8})
    assert model.noise_std == model.hparams["noise_std"] == noise_std
    assert (model.standardizer is not None) is standardized


def test_help_tells_the_noise_defaults(capsys):
    assert run_cli(["simplenet", "net", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: 1.0, in units of each channel's feature std" in text and "the reference's 0.05" in text


@pytest.mark.parametrize("argv, shows", [(["--help"], "--log_project"), (["net", "--help"], "--dsc_margin"),
                                         (["net", "dataset", "-h"], "--rotate_degrees")])
def test_help_of_each_part(argv, shows, capsys):
    assert run_cli(["simplenet", *argv]) == 0
    assert shows in capsys.readouterr().out


def test_run_sh_command_line_maps_onto_the_model(monkeypatch):
    """The reference's run.sh options reach SimpleNet's constructor unchanged."""
    parsed = cli_simplenet.parse(
        "--gpu 4 --seed 0 --log_group simplenet_mvtec --log_project MVTecAD_Results --results_path results "
        "--run_name run net -b wideresnet50 -le layer2 -le layer3 --pretrain_embed_dimension 1536 "
        "--target_embed_dimension 1536 --patchsize 3 --meta_epochs 40 --embedding_size 256 --gan_epochs 4 "
        "--noise_std 0.015 --dsc_hidden 1024 --dsc_layers 2 --dsc_margin .5 --pre_proj 1 dataset --batch_size 8 "
        "--resize 329 --imagesize 288 -d screw -d pill mvtec /data".split())
    kwargs = cli_simplenet.model_kwargs(parsed["net"], parsed["dataset"])
    assert kwargs["backbone"] == "wide_resnet50_2" and kwargs["layers_to_extract_from"] == ["layer2", "layer3"]
    assert {k: kwargs[k] for k in ("pretrain_embed_dimension", "meta_epochs", "gan_epochs", "noise_std", "dsc_hidden",
                                   "dsc_margin", "pre_proj", "embedding_size", "resize", "imagesize")} == dict(
        pretrain_embed_dimension=1536, meta_epochs=40, gan_epochs=4, noise_std=0.015, dsc_hidden=1024,
        dsc_margin=0.5, pre_proj=1, embedding_size=256, resize=329, imagesize=288)
    assert parsed["dataset"].subdatasets == ["screw", "pill"] and parsed["main"].gpu == [4]
    assert vars(cli_simplenet.parse(["--log-group", "g", "net", "--dsc-margin", "0.3", "dataset", "mvtec", "d", "x"])
                ["net"])["dsc_margin"] == 0.3  # dashed spelling too


@pytest.mark.parametrize("argv, message", [
    (["net", "--dsc_margn", "0.5", "dataset", "mvtec", "d", "x"], "unknown net option --dsc_margn. Did you mean --dsc_margin?"),
    (["net", "dataset", "--imagsize", "9", "mvtec", "d", "x"], "Did you mean --imagesize?"),
    (["--log_grop", "g", "net", "dataset", "mvtec", "d", "x"], "unknown main option --log_grop. Did you mean --log_group?"),
    (["net", "--batch_size", "4", "dataset", "mvtec", "d", "x"], "--batch_size is a 'dataset' option"),
    (["nett", "dataset", "mvtec", "d", "x"], "Did you mean 'net'?"),
    (["net", "datset", "mvtec", "d", "x"], "missing the 'dataset' part ('datset': did you mean 'dataset'?)"),
    (["net", "dataset", "mvtek", ".", "x"], "unknown data set 'mvtek'. Did you mean 'mvtec'?"),
    (["net", "dataset", "mvtec", "."], "no subdataset given"),
    (["net", "-b", "resnet18", "-b", "wideresnet50", "dataset", "mvtec", ".", "x"], "one backbone per run"),
])
def test_unknown_or_misspelt_options_name_the_closest_valid_one(argv, message, capsys):
    assert run_cli(["simplenet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_form_rejects_misspelt_simplenet_options(capsys):
    assert run_cli(["train", "--model", "simplenet", "--data", "synthetic", "--noise_sdt", "0.1"]) == 2
    assert "Did you mean --noise_std?" in capsys.readouterr().err
    assert run_cli(["train", "--dsc_margin", "0.5"]) == 2  # only SimpleNet takes its options


# ---- gpu ------------------------------------------------------------------------------------------------
def test_gpu_maps_to_the_device_and_falls_back_to_cpu_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_simplenet.device_options([0]) == dict(accelerator="cpu", devices=1)
    assert "no GPU is available: running on CPU" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli_simplenet.device_options(None) == dict(accelerator="cuda", devices=[0])
    assert cli_simplenet.device_options([1]) == dict(accelerator="cuda", devices=[1])
    with pytest.raises(cli_simplenet.UsageError, match="has 2 GPU"):
        cli_simplenet.device_options([5])


# ---- both forms reach the same code ------------------------------------------------------------------
def test_train_model_simplenet_reaches_the_same_run(monkeypatch, data_root):
    calls = []
    monkeypatch.setattr(cli_simplenet, "run", lambda kwargs, splits, engine, **kw: calls.append(
        (kwargs, [c for c, _ in splits], engine, kw)) or [])
    assert run_cli(["simplenet", "--no_progress", "net", "-b", "efficientnet_lite0", "--meta_epochs", 3,
                    "--dsc_margin", 0.5, "dataset", "--resize", 64, "--imagesize", 64, "--hflip", 0.5, "--augment",
                    "--batch_size", 4, "--num_workers", 0, "mvtec", data_root, "fabric"]) == 0
    assert run_cli(["train", "--model", "simplenet", "--data", "mvtec", "--data-path", data_root, "--category",
                    "fabric", "--image-size", 64, "--epochs", 3, "--dsc_margin", 0.5, "--hflip", 0.5, "--augment",
                    "--batch-size", 4, "--no-images"]) == 0
    (a_kwargs, a_cats, a_engine, _), (b_kwargs, b_cats, b_engine, _) = calls
    b_kwargs.pop("visualizer")
    assert a_kwargs == b_kwargs and a_cats == b_cats == ["fabric"]
    assert a_engine["batch_size"] == b_engine["batch_size"] == 4


# ---- a full run: outputs as in the seed -------------------------------------------------------------
def test_run_folder_as_in_the_seed(two_subdatasets):
    assert two_subdatasets["code"] == 0
    run_dir = two_subdatasets["run_dir"]
    for index in (0, 1):
        assert (run_dir / "models" / str(index) / "ckpt.pth").is_file()
    state = torch.load(run_dir / "models" / "0" / "ckpt.pth", weights_only=True)["state_dict"]
    assert any(k.startswith("discriminator.") for k in state) and any(k.startswith("pre_projection.") for k in state)
    assert not any(k.startswith("feature_extractor.") for k in state)
    params = json.loads((run_dir / "models" / "0" / "params.json").read_text())
    assert params["model"] == "simplenet" and params["hparams"]["meta_epochs"] == 2
    last = torch.load(run_dir / "models" / "0" / "last.ckpt", weights_only=True)
    assert last["epoch"] == last["max_epochs"] == 4  # meta_epochs 2 x gan_epochs 2
    assert params["hparams"]["patchsize"] == 3 and params["hparams"]["imagesize"] == 64
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    rows = read_csv(run_dir / "results.csv")
    assert [r["category"] for r in rows] == ["fabric", "wood", "mean"]
    assert float(rows[2]["image_auroc"]) == pytest.approx(
        (float(rows[0]["image_auroc"]) + float(rows[1]["image_auroc"])) / 2, abs=1e-3)
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["fabric", "wood"]  # save_segmentation_images


def test_no_segmentation_images_unless_asked(tmp_path, data_root):
    assert run_cli(["simplenet", "--results_path", tmp_path, "--no_progress", *FAST_NET, "dataset", *FAST_DATA,
                    "mvtec", data_root, "fabric"]) == 0
    run_dir = tmp_path / "project" / "group" / "test"  # reference defaults for the run folder
    assert (run_dir / "results.csv").is_file() and not (run_dir / "images").exists()


def test_test_flag_evaluates_the_trained_run_without_training(two_subdatasets, capsys):
    argv = [a for a in two_subdatasets["argv"] if a != "--save_segmentation_images"]
    ckpt = two_subdatasets["run_dir"] / "models" / "0" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    rows_before = read_csv(two_subdatasets["run_dir"] / "results.csv")
    assert run_cli([argv[0], "--test", *argv[1:]]) == 0
    assert ckpt.stat().st_mtime_ns == before  # nothing trained
    rows = read_csv(two_subdatasets["run_dir"] / "results.csv")
    assert [r["image_auroc"] for r in rows] == [r["image_auroc"] for r in rows_before]
    capsys.readouterr()
    assert run_cli(["simplenet", "--test", "--run_name", "never", *argv[argv.index("net"):]]) == 2
    assert "--test: No trained model" in capsys.readouterr().err


def test_same_seed_same_model_other_seed_other_model(tmp_path, data_root):
    def ckpt(seed, name):
        assert run_cli(["simplenet", "--results_path", tmp_path, "--run_name", name, "--seed", seed, "--no_progress",
                        *FAST_NET, "dataset", *FAST_DATA, "mvtec", data_root, "fabric"]) == 0
        return torch.load(tmp_path / "project" / "group" / name / "models" / "0" / "ckpt.pth",
                          weights_only=True)["state_dict"]

    a, b, c = ckpt(1, "a"), ckpt(1, "b"), ckpt(2, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_model_simplenet_end_to_end(tmp_path):
    code = run_cli(["train", "--model", "simplenet", "--data", "synthetic", "--data-path", tmp_path / "data",
                    "--category", "fabric", "--image-size", 64, "--epochs", 1, "--results-path", tmp_path / "results",
                    "--run-name", "t", "--no-progress", "--accelerator", "cpu", "--no-images",
                    "--target_embed_dimension", 64, "--pretrain_embed_dimension", 64])
    assert code == 0
    rows = read_csv(tmp_path / "results" / "defectscope" / "synthetic" / "t" / "results.csv")
    assert rows[0]["category"] == "fabric" and 0 <= float(rows[0]["image_auroc"]) <= 1


def test_train_without_epochs_gives_each_category_the_step_minimum(monkeypatch, tmp_path, data_root):
    """No --epochs: SimpleNet's default_epochs, raised per category to min_default_steps
    (6 training images, 1 held out, batch 4: one step an epoch); --epochs and --meta_epochs win."""
    from defectscope.models import SimpleNet

    monkeypatch.setattr(SimpleNet, "min_default_steps", 5)
    base = ["train", "--model", "simplenet", "--data", "mvtec", "--data-path", data_root, "--category", "fabric",
            "--image-size", 64, "--batch-size", 4, "--no-images", "--no-progress", "--no-test", "--accelerator", "cpu",
            "--results-path", tmp_path, "--target_embed_dimension", 32, "--pretrain_embed_dimension", 32]

    def trained_epochs(name, *extra):
        assert run_cli([*base, "--run-name", name, *extra]) == 0
        last = torch.load(tmp_path / "defectscope" / "mvtec" / name / "models" / "0" / "last.ckpt", weights_only=True)
        return last["max_epochs"]

    assert trained_epochs("default") == 5
    monkeypatch.setattr(SimpleNet, "min_default_steps", 2)
    assert trained_epochs("few_steps") == SimpleNet.default_epochs == 3
    assert trained_epochs("epochs", "--epochs", 2) == 2
    assert trained_epochs("meta", "--meta_epochs", 1, "--gan_epochs", 2) == 2


def test_main_and_data_options_reach_the_run(monkeypatch, data_root):
    calls = []
    monkeypatch.setattr(cli_simplenet, "run", lambda kwargs, splits, engine, **kw: calls.append((engine, kw)) or [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli(["simplenet", "--results_path", "out", "--log_project", "P", "--log_group", "G", "--run_name", "R",
                    "--seed", 7, "--test", "--save_segmentation_images", "net", "dataset", "--batch_size", 5,
                    "--num_workers", 1, "mvtec", data_root, "fabric"]) == 0
    engine, kw = calls[0]
    assert {k: engine[k] for k in ("results_path", "project", "group", "run_name", "batch_size", "num_workers",
                                   "accelerator")} == dict(results_path="out", project="P", group="G", run_name="R",
                                                           batch_size=5, num_workers=1, accelerator="cpu")
    data = kw.pop("data")
    assert kw == dict(seed=7, test_only=True, save_images=True)
    # What run.json records, so that `defectscope test` can rebuild the split.
    assert data == dict(data="mvtec", data_path=str(data_root.resolve()), category=["fabric"], split_seed=0,
                        train_defect_fraction=0.0)
