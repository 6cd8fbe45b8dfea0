"""The run config (sftok_platform.config over sftok.config): presets, dotted overrides, type checks, validate()."""
import pytest

from sftok_platform.config import Config, ConfigError, apply_override, list_presets, load_config
from sftok.registry import model_config


@pytest.mark.parametrize("preset,model_name", [("tiny", "sftok_tiny"), ("b64", "sftok_b64"), ("l64", "sftok_l64")])
def test_presets_load_and_match_registry(preset, model_name):
    cfg = load_config(preset)
    assert cfg.preset == preset
    expected = model_config(model_name)
    if preset == "tiny":   # the CPU preset: tiny ViTs on 32 px images, an f4 teacher (8x8 grid), scaled init
        expected = model_config(model_name, image_size=32, patch_size=4, num_proxy_codes=64, teacher_codebook_size=256,
                                init_std=0.088, pixel_hidden_channels=16, pixel_z_channels=64,
                                pixel_channel_mult=[1, 2, 4], pixel_num_res_blocks=1, pixel_norm_groups=0,
                                pixel_shortcut="input")
    assert cfg.model == expected


def test_preset_list_and_unknown_preset():
    assert {"tiny", "b64", "l64"} <= set(list_presets())
    with pytest.raises(ConfigError, match="unknown preset 'b128'.*tiny"):
        load_config("b128")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["stage2.replace_prob=0.5", "train.workers=2", "stage1.global_batch_size=32",
                               "eval.steps=[1,8]", "model.pixel_head=false", "model.assignment=per_image",
                               "stage1.lr=1e-3"])
    assert cfg.stage2.replace_prob == 0.5 and isinstance(cfg.stage2.replace_prob, float)
    assert cfg.train.workers == 2 and cfg.stage1.global_batch_size == 32
    assert cfg.eval.steps == [1, 8] and cfg.model.pixel_head is False
    assert cfg.model.assignment == "per_image" and cfg.stage1.lr == pytest.approx(1e-3)
    # ints are accepted for floats, comma lists for lists, nested dicts for sections
    cfg = load_config("tiny", {"stage2.replace_prob": 1, "eval": {"steps": "1,2"}})
    assert cfg.stage2.replace_prob == 1.0 and cfg.eval.steps == [1, 2]


def test_unknown_key_refused_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage2.replace_prb'.*Did you mean 'stage2.replace_prob'"):
        load_config("tiny", ["stage2.replace_prb=0.5"])
    with pytest.raises(ConfigError, match="Did you mean 'model'"):
        load_config("tiny", ["modle.codebook_size=8"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["stage2.replace_prob"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("tiny", ["train.workers.x=1"])


@pytest.mark.parametrize("override,match", [
    ("train.workers=two", "expects an integer"),
    ("train.workers=1.5", "expects an integer"),
    ("model.pixel_head=maybe", "expects true/false"),
    ("stage1.lr=fast", "expects a number"),
    ("model.encoder_size=[1,2]", "expects a string"),
    ("model=3", "is a section"),
])
def test_type_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


@pytest.mark.parametrize("override,match", [
    ("model.encoder_size=huge", "not a known size; use one of"),
    ("model.image_size=250", "not a multiple of model.patch_size"),
    ("model.num_proxy_codes=100", r"must equal the teacher code grid.*set model.num_proxy_codes=\d+"),
    ("model.assignment=nearest", "use 'batch'"),
    ("model.teacher_codebook_size=512", "set both to the same value"),
    ("teacher.norm_groups=4", r"model.pixel_norm_groups=0 differs from teacher.norm_groups=4"),
    ("model.pixel_hidden_channels=32", "the pixel head is the teacher decoder"),
    ("teacher.channel_mult=[1,2,2,4]", r"model.pixel_channel_mult=\[1, 2, 4\] differs"),
    ("teacher.shortcut=middle", "teacher layout: shortcut='middle'"),
    ("teacher.init=xavier", "use 'torch'"),
    ("model.init_std=0", "must be > 0"),
    ("train.precision=fp8", "use auto, fp32, bf16 or fp16"),
    ("train.max_nonfinite_steps=-1", "stop at the first non-finite step"),
    ("train.grad_compression=bf16", "needs train.gpu=true"),
    ("train.grad_compression=fp8", "use none or bf16"),
    ("train.checkpoint_upload=later", "use sync or async"),
    ("train.placement_strategy=RANDOM", "PACK, SPREAD"),
    ("train.max_failures=-2", "retry without limit"),
    ("train.torch_threads=-2", "train.torch_threads=-2"),
    ("train.workers=0", "at least 1 worker"),
    ("stage1.grad_accum=3", "multiple of 3"),
    ("stage2.replace_prob=1.5", r"stage2.replace_prob=1.5 is out of range: it must be in \[0, 1\]"),

    ("stage1.steps=-1", ">= 0"),
    ("run.stages=[stage1,stage9]", "unknown entries"),
    # zero, negative and empty values: refused here, before Ray or any compute starts
    ("eval.steps=[0]", r"decoding step counts >= 1"),
    ("eval.steps=[]", r"decoding step counts >= 1"),
    ("eval.steps=[1,2,2]", r"list each decoding step count once"),    # else refused only at the final evaluation
    ("stage1.lr=-1", r"stage1.lr=-1.0 is out of range: it must be > 0"),
    ("stage1.global_batch_size=0", r"stage1.global_batch_size=0 is out of range: it must be a whole number >= 1"),
    ("stage3.steps=0", r"stage3.steps=0 is out of range"),
    ("stage2.beta2=1.0", r"in \[0, 1\)"),
    ("eval.batch_size=0", "eval.batch_size=0"),
    ("train.ema_decay=1", r"in \[0, 1\)"),
    ("train.log_every=0", "train.log_every=0"),
    ("data.synthetic_images=0", "data.synthetic_images=0"),
    ("losses.discriminator_lr=0", "must be > 0"),
    ("model.codebook_size=0", "model.codebook_size=0"),
    ("generator.width=0", "generator.width=0"),
])
def test_validate_messages(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])
    load_config("tiny", [override], validate=False)      # refused only by validate()


@pytest.mark.parametrize("override", ["stage1.replace_prob=0.5", "stage3.unmasked_weight=0.2",
                                      "stage0.label_smoothing=0.1", "stage1.unmasked_weight=0.3"])
def test_a_knob_a_stage_does_not_read_is_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'.*Valid keys here: steps"):
        load_config("tiny", [override], validate=False)


def test_teacher_grid_must_divide_the_image():
    with pytest.raises(ConfigError, match="multiple of the teacher's downsampling factor 4"):
        load_config("tiny", ["model.image_size=34", "model.patch_size=2"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config("tiny", ["stage2.replace_prob=0.25", "run.name=abc"])
    path = cfg.save(tmp_path / "resolved.yaml")
    back = load_config(path)
    assert back.to_dict() == cfg.to_dict()
    assert back.flat()["stage2.replace_prob"] == 0.25


def test_apply_override_on_section_object():
    cfg = Config()
    apply_override(cfg, "model", {"codebook_size": 4096})
    assert cfg.model.codebook_size == 4096
    with pytest.raises(ConfigError, match="Valid keys here"):
        apply_override(cfg, "model.codebok_size", 1)


def test_presets_load_from_a_non_editable_install(tmp_path):
    """The presets are package data: a plain ``pip install .`` (no source tree) still loads ``tiny``."""
    import subprocess
    import sys
    from pathlib import Path
    import shutil
    repo = Path(__file__).resolve().parent.parent
    src, target = tmp_path / "src", tmp_path / "site"     # built from a copy: setuptools writes build/ in-tree
    for name in ("sftok", "sftok_platform"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    code = ("import sftok_platform.config as c; cfg = c.load_config('tiny'); "
            "print(c.__file__, cfg.preset, cfg.model.image_size, ','.join(c.list_presets()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where, preset, size, names = out.stdout.split()
    from sftok_platform.config import load_config       # the source tree's tiny preset, as installed
    assert where.startswith(str(target)) and preset == "tiny" and size == str(load_config("tiny").model.image_size)
    assert {"tiny", "b64", "l64"} <= set(names.split(","))
