"""Every validation rule of rglcd.config, one table: each rule's value just outside its range is refused with its
one-line message (and nothing else), and each range's boundary values are accepted. Validation reads no model: the
teacher here is an empty folder (VAE factor 8, the default without a vae/config.json), so the table runs in
milliseconds per row."""

import json

import pytest

import rglcd.config
from rglcd.config import MAX_COUNT, MAX_RESOLUTION, MAX_SEED, ConfigError, load_config
from rglcd.rewards.weights import MODEL_RECORD_FILE, MODEL_WEIGHTS_FILE

LATENT = ["reward.mode=latent", "reward.latent.model={proxy}"]  # a latent-mode run with a matching 4² proxy
SAMPLE = ["reward.target=sample"]
OK = None  # the row's overrides validate


class Begins(str):
    """An expected problem line given by its start: the rest is another library's words (PyYAML's parser) or a
    registry's current contents."""


# (overrides, the problem lines expected, in order: one string or a list, or OK). "{name}" is a folder of the
# `folders` fixture.
RULES = [
    # seed and precision.compile (validate)
    (["seed=-1"], f"seed: must be from 0 to {MAX_SEED} (2**32 - 1), got -1"),
    ([f"seed={MAX_SEED + 1}"], f"seed: must be from 0 to {MAX_SEED} (2**32 - 1), got {MAX_SEED + 1}"),
    (["seed=0"], OK),
    ([f"seed={MAX_SEED}"], OK),
    (
        ["precision.compile=true"],
        "precision.compile: on the CPU torch.compile needs a C++ compiler (g++ or clang++, or $CXX), none found; "
        "install one (e.g. apt-get install g++) or set precision.compile=false",
    ),
    # model and lora
    (["model.teacher="], "model.teacher: required; a hub id or a local diffusers pipeline folder"),
    (
        ["model.teacher=/no/such/folder"],
        "model.teacher: /no/such/folder does not exist; give an existing folder or a hub id (owner/name)",
    ),
    (["model.teacher=owner/name"], OK),  # a hub id is not looked up
    (["model.time_cond_proj_dim=0"], "model.time_cond_proj_dim: must be > 0 (256 is LCM's)"),
    (["model.time_cond_proj_dim=1"], OK),
    (["lora.rank=-1"], "lora.rank: must be >= 0 (0 trains the whole UNet; LCM-LoRA uses 64)"),
    (["lora.alpha=0"], "lora.alpha: must be > 0, or null for the rank"),
    (["lora.alpha=null"], OK),
    (["lora.alpha=0.5"], OK),  # any positive scale, not only >= 1
    (["lora.dropout=-0.01"], "lora.dropout: must be in [0, 1)"),
    (["lora.dropout=1"], "lora.dropout: must be in [0, 1)"),
    (["lora.dropout=0"], OK),
    (["lora.rank=4", "lora.target_modules=[]"], "lora.target_modules: name at least one module"),
    (["lora.target_modules=[]"], OK),  # no adapters, no modules needed
    (["lora.fuse_on_export=true"], "lora.fuse_on_export: only for LoRA runs (lora.rank > 0)"),
    (["lora.rank=1", "lora.fuse_on_export=true"], OK),
    # data and distill
    (["data.source="], "data.source: required; webdataset shards (path, {000..009} pattern, pipe:) or a folder"),
    (["data.resolution=30"], "data.resolution: 30 must be a positive multiple of the VAE factor 8 (pixels per latent)"),
    (["data.resolution=0"], "data.resolution: 0 must be a positive multiple of the VAE factor 8 (pixels per latent)"),
    (["data.resolution=8"], OK),
    ([f"data.resolution={MAX_RESOLUTION + 8}"], f"data.resolution: at most {MAX_RESOLUTION} pixels"),
    ([f"data.resolution={MAX_RESOLUTION}"], OK),
    (["data.caption_dropout=-0.01"], "data.caption_dropout: must be in [0, 1)"),
    (["data.caption_dropout=1"], "data.caption_dropout: must be in [0, 1)"),
    (["data.caption_dropout=0"], OK),
    (["data.shuffle_buffer=-1"], "data.shuffle_buffer: must be >= 0"),
    (["data.shuffle_buffer=0"], OK),
    (
        ["distill.num_ddim_timesteps=0"],  # dmd.student_steps (1) no longer fits the grid either
        [
            "distill.num_ddim_timesteps: must be in [1, num_train_timesteps]; the paper uses 50",
            "dmd.student_steps: must be in [1, distill.num_ddim_timesteps = 0]",
        ],
    ),
    (
        ["distill.num_ddim_timesteps=1001"],
        "distill.num_ddim_timesteps: must be in [1, num_train_timesteps]; the paper uses 50",
    ),
    (["distill.num_ddim_timesteps=1"], OK),
    (["distill.num_ddim_timesteps=1000"], OK),
    (["distill.w_min=15.5"], "distill.w_min (15.5) > distill.w_max (15.0): swap them"),
    (["distill.w_min=15"], OK),  # w_min = w_max: one guidance scale
    (
        ["distill.w_min=-0.5", "distill.w_max=1"],
        "distill.w_min: must be >= 0 (LCM convention: w = 0 is the conditional model)",
    ),
    (["distill.w_min=0"], OK),
    (["distill.loss=l1"], "distill.loss: 'l1' is not one of 'cauchy', 'huber', 'l2', 'pseudo_huber'"),
    (["distill.distance_c=0"], "distill.distance_c: must be > 0, or null for the default"),
    (["distill.distance_c=1e-9"], OK),
    (["distill.ema_decay=-0.01"], "distill.ema_decay: must be in [0, 1); the paper uses 0.95"),
    (["distill.ema_decay=1"], "distill.ema_decay: must be in [0, 1); the paper uses 0.95"),
    (["distill.ema_decay=0"], OK),
    (["distill.lcd_weight=-1"], "distill.lcd_weight: must be >= 0 (1: the paper's consistency term; 0 turns it off)"),
    (["distill.lcd_weight=0"], OK),  # the preset's colorfulness term (beta 0.1) remains
    # reward
    (
        ["reward.terms=[{name: hpsv9}]"],
        # the list that follows is the registry, which other tests in the same process may have added to
        Begins("reward.terms[0].name: unknown reward 'hpsv9'; available: "),
    ),
    (["reward.terms=[{name: colorfulness, std: 0}]"], "reward.terms[0].std: must be > 0 (1 = no standardisation)"),
    (["reward.terms=[{name: colorfulness, std: 1e-9}]"], OK),
    (["reward.decode_batch_size=-1"], "reward.decode_batch_size: must be >= 0 (0 = whole batch)"),
    (["reward.decode_batch_size=0"], OK),
    (["reward.every=0"], "reward.every: must be >= 1 (1: the reward term on every step)"),
    (["reward.every=1"], OK),
    ([*SAMPLE, "reward.terms=[]"], "reward.target: sample needs a reward to maximise; add reward.terms"),
    (
        [*SAMPLE, "reward.sample_steps=51"],
        "reward.sample_steps: must be in [1, distill.num_ddim_timesteps = 50] (the steps users sample with)",
    ),
    (
        [*SAMPLE, "reward.sample_steps=0"],
        [
            "reward.sample_steps: must be in [1, distill.num_ddim_timesteps = 50] (the steps users sample with)",
            "reward.grad_steps: must be in [1, reward.sample_steps = 0]",
        ],
    ),
    ([*SAMPLE, "reward.sample_steps=50", "reward.grad_steps=50"], OK),
    ([*SAMPLE, "reward.sample_steps=1", "reward.grad_steps=1"], OK),
    ([*SAMPLE, "reward.grad_steps=0"], "reward.grad_steps: must be in [1, reward.sample_steps = 2]"),
    ([*SAMPLE, "reward.grad_steps=3"], "reward.grad_steps: must be in [1, reward.sample_steps = 2]"),
    # reward.mode=latent
    ([*LATENT, "reward.terms=[]"], "reward.terms: latent mode needs the expert reward(s) the proxy is fitted to"),
    (
        ["reward.mode=latent"],
        "reward.latent.model: (empty) is not a latent proxy RM folder; make one with `rglcd lrm pretrain`",
    ),
    (
        ["reward.mode=latent", "reward.latent.model={teacher}"],
        "reward.latent.model: {teacher} is not a latent proxy RM folder; make one with `rglcd lrm pretrain`",
    ),
    (
        ["reward.mode=latent", "reward.latent.model={proxy8}"],
        "reward.latent.model: its latents are 8² but data.resolution 32 gives 4²; pretrain it with `rglcd lrm "
        "pretrain --resolution 32`",
    ),
    (LATENT, OK),
    ([*LATENT, "reward.latent.learning_rate=0"], "reward.latent.learning_rate: must be > 0 (the paper's is 3.3e-6)"),
    ([*LATENT, "reward.latent.batch_size=0"], "reward.latent.batch_size: must be in [1, optim.batch_size = 8]"),
    ([*LATENT, "reward.latent.batch_size=9"], "reward.latent.batch_size: must be in [1, optim.batch_size = 8]"),
    ([*LATENT, "reward.latent.batch_size=1"], OK),
    ([*LATENT, "reward.latent.batch_size=8"], OK),
    ([*LATENT, "reward.latent.unlocked_image_groups=-1"], "reward.latent.unlocked_image_groups: must be >= 0"),
    ([*LATENT, "reward.latent.unlocked_text_groups=-1"], "reward.latent.unlocked_text_groups: must be >= 0"),
    ([*LATENT, "reward.latent.unlocked_image_groups=0", "reward.latent.unlocked_text_groups=0"], OK),
    ([*LATENT, "reward.latent.loss_scale=0"], "reward.latent.loss_scale: must be > 0"),
    # the loss's terms, dmd.* and gan.* (_check_matching)
    (
        ["distill.lcd_weight=0", "reward.terms=[]"],
        "the loss has no term: distill.lcd_weight, dmd.weight and gan.weight are 0 and no reward term has a non-zero "
        "beta; set distill.lcd_weight=1 (the paper's) or another term's weight",
    ),
    (
        ["distill.lcd_weight=0", "reward.terms=[{name: colorfulness, beta: 0}]"],
        "the loss has no term: distill.lcd_weight, dmd.weight and gan.weight are 0 and no reward term has a non-zero "
        "beta; set distill.lcd_weight=1 (the paper's) or another term's weight",
    ),
    (
        [*LATENT, "distill.lcd_weight=0", "reward.latent.beta=0"],
        "the loss has no term: distill.lcd_weight, dmd.weight and gan.weight are 0 and no reward term has a non-zero "
        "beta; set distill.lcd_weight=1 (the paper's) or another term's weight",
    ),
    (["distill.lcd_weight=0", "reward.terms=[]", "dmd.weight=0.5"], OK),
    (["distill.lcd_weight=0", "reward.terms=[]", "gan.weight=0.5"], OK),
    (["dmd.weight=-1"], "dmd.weight: must be >= 0 (0 turns distribution matching off)"),
    (["gan.weight=-1"], "gan.weight: must be >= 0 (0 turns the adversarial term off)"),
    (["dmd.student_steps=0"], "dmd.student_steps: must be in [1, distill.num_ddim_timesteps = 50]"),
    (["dmd.student_steps=51"], "dmd.student_steps: must be in [1, distill.num_ddim_timesteps = 50]"),
    (["dmd.student_steps=1"], OK),
    (["dmd.student_steps=50"], OK),
    (
        ["dmd.real_guidance=0.99"],
        "dmd.real_guidance: must be >= 1 (diffusers' CFG scale; 1 = no guidance), or null for the step's w + 1",
    ),
    (["dmd.real_guidance=1"], OK),
    (["dmd.t_min=-0.01"], "dmd.t_min, dmd.t_max: need 0 <= t_min < t_max <= 1 (fractions of T)"),
    (["dmd.t_min=0.98"], "dmd.t_min, dmd.t_max: need 0 <= t_min < t_max <= 1 (fractions of T)"),  # t_min = t_max
    (["dmd.t_max=1.01"], "dmd.t_min, dmd.t_max: need 0 <= t_min < t_max <= 1 (fractions of T)"),
    (["dmd.t_min=0", "dmd.t_max=1"], OK),
    (["dmd.fake_lora_rank=-1"], "dmd.fake_lora_rank: must be >= 0 (0: a whole trained copy of the teacher UNet)"),
    (["dmd.fake_lr=0"], "dmd.fake_lr: must be > 0"),
    (["dmd.fake_updates=0"], "dmd.fake_updates: must be in [1, 100] (DMD2 uses 5)"),
    (["dmd.fake_updates=101"], "dmd.fake_updates: must be in [1, 100] (DMD2 uses 5)"),
    (["dmd.fake_updates=1"], OK),
    (["dmd.fake_updates=100"], OK),
    (["gan.discriminator_weight=0"], "gan.discriminator_weight: must be > 0 (DMD2 uses 0.01)"),
    (["gan.t_max=0"], "gan.t_max: must be in (0, 1] (a fraction of T)"),
    (["gan.t_max=1.01"], "gan.t_max: must be in (0, 1] (a fraction of T)"),
    (["gan.t_max=1"], OK),
    (
        ["gan.weight=0.1", "model.teacher={flat}"],
        "gan.weight: the discriminator reads the fake score network's mid-block, and this teacher's UNet has none "
        "(mid_block_type: null); set gan.weight=0",
    ),
    (["gan.weight=0.1"], OK),  # the teacher's UNet config does not say it has no mid-block
    (["model.teacher={flat}"], OK),  # no GAN term: a UNet without a mid-block is fine
    # optim and logging
    (["optim.learning_rate=0"], "optim.learning_rate: must be > 0 (the paper uses 1e-6)"),
    (["optim.batch_size=0"], f"optim.batch_size: must be in [1, {MAX_COUNT}]"),
    ([f"optim.batch_size={MAX_COUNT + 1}"], f"optim.batch_size: must be in [1, {MAX_COUNT}]"),
    (["optim.batch_size=1"], OK),
    ([f"optim.batch_size={MAX_COUNT}"], OK),
    (["optim.gradient_accumulation_steps=0"], f"optim.gradient_accumulation_steps: must be in [1, {MAX_COUNT}]"),
    (
        [f"optim.gradient_accumulation_steps={MAX_COUNT + 1}"],
        "optim.gradient_accumulation_steps: must be in [1, 65536]",
    ),
    ([f"optim.gradient_accumulation_steps={MAX_COUNT}"], OK),
    (["optim.adam_beta1=-0.01"], "optim.adam_beta1: must be in [0, 1)"),
    (["optim.adam_beta1=1"], "optim.adam_beta1: must be in [0, 1)"),
    (["optim.adam_beta2=-0.01"], "optim.adam_beta2: must be in [0, 1)"),
    (["optim.adam_beta2=1"], "optim.adam_beta2: must be in [0, 1)"),
    (["optim.adam_beta1=0", "optim.adam_beta2=0"], OK),
    (["optim.adam_epsilon=0"], "optim.adam_epsilon: must be > 0"),
    (["optim.weight_decay=-0.01"], "optim.weight_decay: must be >= 0"),
    (["optim.weight_decay=0"], OK),
    (["optim.max_train_steps=0"], "optim.max_train_steps: must be > 0"),
    (["optim.max_train_steps=1"], OK),
    (["optim.max_grad_norm=0"], "optim.max_grad_norm: must be > 0"),
    (["optim.lr_warmup_steps=-1"], "optim.lr_warmup_steps: must be >= 0"),
    (["optim.lr_warmup_steps=0"], OK),
    (
        ["optim.use_8bit_adam=true"],
        "optim.use_8bit_adam: bitsandbytes is not installed; `pip install bitsandbytes` or set false",
    ),
    (["logging.tracker=wandb"], "logging.tracker: wandb is not installed; `pip install wandb` or use tensorboard"),
    (["logging.tracker=none"], OK),
    (["logging.output_dir="], "logging.output_dir: required"),
    (["logging.checkpointing_steps=0"], "logging.checkpointing_steps: must be > 0"),
    (["logging.checkpointing_steps=1"], OK),
    (["logging.checkpoints_total_limit=0"], "logging.checkpoints_total_limit: must be > 0"),
    (["logging.checkpoints_total_limit=1"], OK),
    (["logging.validation_steps=-1"], "logging.validation_steps: must be >= 0 (0 disables validation)"),
    (["logging.validation_steps=0"], OK),
    (["logging.log_every=0"], "logging.log_every: must be > 0"),
    (["logging.log_every=1"], OK),
    (["logging.max_consecutive_nan_steps=0"], "logging.max_consecutive_nan_steps: must be > 0"),
    (["logging.max_consecutive_nan_steps=1"], OK),
    # the shape and types of the values (_from_dict, _convert) and of the overrides (_parse_override)
    (["optim.learning_rat=1"], "optim.learning_rat: unknown field; did you mean optim.learning_rate?"),
    (["optim=3"], "optim: expected a mapping of OptimConfig fields, got 3"),
    (["precision.mixed_precision=fp8"], "precision.mixed_precision: 'fp8' is not one of 'no', 'fp16', 'bf16'"),
    (["precision.mixed_precision=no"], OK),  # YAML's bare `no` is false: read as "no"
    (["lora.target_modules=to_q"], "lora.target_modules: expected a list, got 'to_q'"),
    (["optim.learning_rate=fast"], "optim.learning_rate: expected float, got 'fast'"),
    (["optim.learning_rate=.inf"], "optim.learning_rate: must be a finite number, got inf"),
    (["optim.learning_rate=3e-5"], OK),  # a string to YAML 1.1, a float to rglcd
    (["optim.batch_size=many"], "optim.batch_size: expected int, got 'many'"),
    (["optim.batch_size=true"], "optim.batch_size: expected int, got True"),
    (["optim.batch_size"], "override 'optim.batch_size' must look like section.field=value (e.g. optim.batch_size=4)"),
    (
        ["optim.batch_size=[1"],
        Begins("override 'optim.batch_size=[1': the value is not YAML (while parsing a flow sequence"),  # PyYAML's
    ),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An empty teacher folder, one whose UNet has no mid-block, latent proxy RM folders for 4² and 8² latents (a
    config.json is what validation reads), and the data and run folders."""
    root = tmp_path_factory.mktemp("rules")
    paths = {name: root / name for name in ("teacher", "flat", "proxy", "proxy8", "data", "run")}
    for path in paths.values():
        path.mkdir()
    (paths["flat"] / "unet").mkdir()
    (paths["flat"] / "unet" / "config.json").write_text(json.dumps({"mid_block_type": None}))
    for name, side in (("proxy", 4), ("proxy8", 8)):
        record = {"kind": "latent-clip", "config": {"latent_size": side}}
        (paths[name] / MODEL_RECORD_FILE).write_text(json.dumps(record))
        (paths[name] / MODEL_WEIGHTS_FILE).write_bytes(b"")
    return {name: str(path) for name, path in paths.items()}


def filled(text: str, folders: dict[str, str]) -> str:
    """``text`` with each "{name}" of ``folders`` replaced by its path (other braces, YAML's, stay)."""
    for name, path in folders.items():
        text = text.replace("{" + name + "}", path)
    return text


def problems(error: ConfigError) -> list[str]:
    """The problem lines of a ConfigError: validation's list under "invalid config:", or the one message."""
    text = str(error)
    return [line.strip() for line in text.splitlines()[1:]] if text.startswith("invalid config:") else [text]


@pytest.mark.parametrize("overrides, expected", RULES, ids=[" ".join(overrides) for overrides, _ in RULES])
def test_every_rule_refuses_just_outside_its_range_and_takes_its_boundary(folders, monkeypatch, overrides, expected):
    """The base (the tiny preset on empty folders) is valid; each row's overrides then give exactly the expected
    problem lines, in order, or none. No C++ compiler, bitsandbytes or wandb is assumed, whatever is installed."""
    monkeypatch.setattr(rglcd.config, "compile_unavailable", lambda: True)
    monkeypatch.setattr(rglcd.config, "_installed", lambda module: False)
    base = [f"model.teacher={folders['teacher']}", f"data.source={folders['data']}"]
    base.append(f"logging.output_dir={folders['run']}")
    given = [filled(override, folders) for override in overrides]
    if expected is OK:
        config = load_config("tiny", [*base, *given])
        assert config.model.teacher and config.data.resolution % 8 == 0  # validated, returned
        return
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*base, *given])
    expected_lines = [expected] if isinstance(expected, str) else list(expected)
    lines = problems(error.value)
    assert len(lines) == len(expected_lines), lines
    for line, wanted in zip(lines, expected_lines, strict=True):  # whole lines, in order
        wanted_text = filled(wanted, folders)
        assert line.startswith(wanted_text) if isinstance(wanted, Begins) else line == wanted_text
