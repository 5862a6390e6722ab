import pytest
import yaml

from rglcd.config import ConfigError, TrainConfig, load_config, presets


@pytest.fixture
def tiny_paths(tmp_path, epsilon_teacher_dir):
    data = tmp_path / "data"
    data.mkdir()
    return [f"model.teacher={epsilon_teacher_dir}", f"data.source={data}", f"logging.output_dir={tmp_path / 'run'}"]


def test_presets_ship_and_parse():
    assert {"tiny", "sd15-512", "sd21-768"} <= set(presets())
    for name in ("sd15-512", "sd21-768"):
        config = load_config(name)  # hub ids are not checked for existence
        assert config.distill.num_ddim_timesteps == 50 and config.distill.ema_decay == 0.95
        assert config.optim.learning_rate == 1e-6 and config.distill.loss == "huber"
    assert load_config("sd21-768").data.resolution == 768
    lora = load_config("sd15-512-lora")
    assert lora.lora.rank == 64 and lora.optim.learning_rate == 1e-4 and "to_q" in lora.lora.target_modules


def _flat(config) -> dict:
    """A config as {"section.field": value} (top-level fields such as seed by their own name)."""
    flat = {}
    for name, value in config.items():
        flat.update({f"{name}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
    return flat


@pytest.mark.parametrize(
    "preset, base, recipe",
    [
        ("world-one-step", "world", {"dmd.fake_lr": 1e-4}),
        ("sd15-512-one-step", "sd15-512", {}),  # the fake network's rate: DMD2's 1e-5, the default
        (
            "sdxl-1024-one-step",
            "sdxl-1024",
            {"lora.rank": 64, "dmd.fake_lora_rank": 64, "dmd.fake_lr": 1e-4, "optim.learning_rate": 1e-4},
        ),
    ],
)
def test_a_one_step_preset_is_its_base_preset_with_the_one_step_recipe(
    preset, base, recipe, tmp_path, epsilon_teacher_dir
):
    """The reward on the 1-step sample and DMD at 0.3 (docs/one-step.md), and the switches `rglcd plan` picked."""
    found = [f"model.teacher={epsilon_teacher_dir}", f"data.source={tmp_path}"]  # the world's need a filled cache
    one_step, plain = (_flat(load_config(name, found).to_dict()) for name in (preset, base))
    changed = {key: value for key, value in one_step.items() if plain[key] != value}
    output_dir = changed.pop("logging.output_dir")
    assert output_dir.startswith("runs/") and output_dir != plain["logging.output_dir"]
    assert changed == {"reward.target": "sample", "reward.sample_steps": 1, "dmd.weight": 0.3, **recipe}


def test_a_config_file_can_start_from_a_preset(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("base: sd15-512\noptim:\n  learning_rate: 2.0e-6\nreward:\n  terms: []\n")
    mine, preset = load_config(config), load_config("sd15-512")
    assert (mine.optim.learning_rate, mine.reward.terms, mine.optim.batch_size) == (2e-6, [], preset.optim.batch_size)
    assert mine.model == preset.model and mine.precision == preset.precision
    config.write_text("base: sd99\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: base: 'sd99' is not another preset \(sd15-512, "):
        load_config(config)


def test_defaults_follow_the_paper():
    config = TrainConfig()
    assert (config.distill.w_min, config.distill.w_max) == (5.0, 15.0)
    assert config.optim.learning_rate == 1e-6 and config.optim.max_grad_norm == 1.0
    assert config.model.time_cond_proj_dim == 256


def test_overrides_are_typed_and_round_trip(tiny_paths, tmp_path):
    config = load_config(
        "tiny", [*tiny_paths, "optim.learning_rate=3e-5", "optim.batch_size=4", "data.random_flip=true"]
    )
    assert config.optim.learning_rate == 3e-5 and config.optim.batch_size == 4 and config.data.random_flip is True
    assert load_config("tiny", [*tiny_paths, "precision.mixed_precision=no"]).precision.mixed_precision == "no"
    assert config.reward.terms[0].name == "colorfulness"
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(saved) == config
    assert yaml.safe_load(saved.read_text())["optim"]["batch_size"] == 4


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.w_min=20", "distill.w_min (20.0) > distill.w_max (15.0): swap them"),
        ("data.resolution=30", "data.resolution: 30 must be a positive multiple of the VAE factor 4"),
        ("reward.terms=[{name: hpsv9}]", "reward.terms[0].name: unknown reward 'hpsv9'"),
        ("model.teacher=/no/such/folder", "model.teacher: /no/such/folder does not exist"),
        ("optim.learning_rat=1", "did you mean optim.learning_rate?"),
        ("optim.batch_size=many", "optim.batch_size: expected int, got 'many'"),
        ("distill.loss=l1", "distill.loss: 'l1' is not one of"),
        ("precision.mixed_precision=fp8", "precision.mixed_precision: 'fp8' is not one of"),
        ("distill.ema_decay=1.0", "distill.ema_decay: must be in [0, 1)"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(tiny_paths, override, message):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*tiny_paths, override])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["reward.target=samples"], "reward.target: 'samples' is not one of 'prediction', 'sample'"),
        (["reward.target=sample", "reward.terms=[]"], "reward.target: sample needs a reward to maximise"),
        (["reward.target=sample", "reward.sample_steps=51"], "reward.sample_steps: must be in [1, distill.num_ddim"),
        (["reward.target=sample", "reward.sample_steps=0"], "reward.sample_steps: must be in [1,"),
        (["reward.target=sample", "reward.grad_steps=3"], "reward.grad_steps: must be in [1, reward.sample_steps = 2]"),
        (["reward.every=0"], "reward.every: must be >= 1"),
    ],
)
def test_sampler_reward_settings_are_checked(tiny_paths, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*tiny_paths, *overrides])
    assert message in str(error.value)
    config = load_config("tiny", [*tiny_paths, "reward.target=sample", "reward.sample_steps=4", "reward.grad_steps=4"])
    assert (config.reward.target, config.reward.sample_steps, config.reward.grad_steps) == ("sample", 4, 4)
    assert TrainConfig().reward.target == "prediction"  # the paper's, by default


def test_all_problems_are_reported_at_once(tiny_paths):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*tiny_paths, "distill.w_min=20", "optim.batch_size=0", "data.caption_dropout=1.5"])
    text = str(error.value)
    assert "distill.w_min" in text and "optim.batch_size" in text and "data.caption_dropout" in text


def test_missing_config_file_and_malformed_override():
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config("sd15-512", ["optim.batch_size"])


def test_8bit_adam_without_bitsandbytes_names_the_fix(tiny_paths):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: 8-bit Adam is available")
    with pytest.raises(ConfigError, match="bitsandbytes is not installed; `pip install bitsandbytes` or set false"):
        load_config("tiny", [*tiny_paths, "optim.use_8bit_adam=true"])


def test_compile_on_the_cpu_needs_a_cpp_compiler(tiny_paths, monkeypatch, tmp_path):
    import rglcd.config

    monkeypatch.setattr(rglcd.config.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    assert rglcd.config.cpp_compiler() is None
    with pytest.raises(ConfigError, match=r"precision.compile: on the CPU torch.compile needs a C\+\+ compiler"):
        load_config("tiny", [*tiny_paths, "precision.compile=true"])
    compiler = tmp_path / "g++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    assert rglcd.config.cpp_compiler() == str(compiler)
    config = load_config("tiny", [*tiny_paths, "precision.compile=true", "precision.channels_last=true"])
    assert config.precision.compile and config.precision.channels_last and not config.precision.allow_tf32
