"""``rglcd plan``: will a training config fit on a GPU, and how long will it take? Answered without any weights.

Every model of the run (teacher, student and target or LoRA adapters, VAE, text encoders, reward models, latent proxy)
is built at its published size on the meta device, cast to the dtypes :func:`rglcd.train.build_networks` gives it,
and counted exactly. The activations are not guessed: one training step — batch preparation, the RG-LCD step under
the config's autocast, backward, gradient clipping, the optimizer step, the EMA update and the proxy's fit — runs on
fake tensors (torch's FakeTensorMode: shapes, dtypes and kernels' output sizes, no data) at the config's batch size
and resolution, while a dispatch mode follows every storage from its allocation to its release. The peak of what
the step allocates on top of the weights and optimizer states is the activations-and-temporaries line; torch's
FLOP formulas count the same ops. A plan for a GPU traces under CUDA's autocast rules (:func:`cuda_autocast_rules`):
CUDA runs normalisations, softmax, upsampling and reductions in float32 where the CPU's autocast keeps them in the low
dtype. What the trace cannot see (the CUDA context, allocator fragmentation, NCCL's buffers) is a stated allowance,
not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.amp.autocast_mode import _cast
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from .architectures import architecture_of, build_teacher
from .config import TrainConfig
from .data.cache import is_cache
from .gpus import GPU
from .models import text_conditioning, update_ema
from .rewards.base import reward_factory
from .rewards.latent import KIND, LatentClip, LatentClipConfig
from .rewards.weights import read_model_config
from .train.build import (
    DTYPES,
    build_distillation,
    build_expert,
    build_networks,
    build_optimizer,
    build_student_reward,
    ema_pairs,
    float_conditions,
    trained_params,
)
from .train.fake_score import FakeScore
from .train.forward import StepParts, training_forward
from .train.proxy import Proxy, set_trainable

GIB = 2**30
# What the trace cannot see on a GPU: the CUDA context and cuBLAS/cuDNN workspaces (typically 0.3-0.8 GiB).
CUDA_CONTEXT_BYTES = GIB // 2
# The caching allocator reserves more than is allocated: freed blocks split by later, differently sized requests
# (typically 5-15 % over the allocated peak in training loops). An allowance on the traced activations.
FRAGMENTATION = 0.10
# NCCL's communicator buffers per process (NCCL_BUFFSIZE, 4 MiB, per channel and peer for each protocol, up to 32
# channels on NVLink, NVLS buffers on Hopper): typically 0.3-1 GiB.
NCCL_BYTES = GIB
PAPER_ITERATIONS = 10_000  # RG-LCD's runs (Li et al. 2024, appendix)


@dataclass
class Part:
    name: str
    detail: str
    bytes: int


@dataclass
class Plan:
    """Memory per process by part (bytes), FLOPs of one optimizer step per process, and what they assume."""

    config: TrainConfig
    processes: int
    sharded: bool  # FSDP over the processes
    device: str  # "cuda" (the default: a GPU run) or "cpu" (what benchmarks/full_size.py measures)
    parts: list[Part] = field(default_factory=list)
    flops: float = 0.0
    phases: dict[str, int] = field(default_factory=dict)  # the trace's peak within each phase of the step
    trace: Trace | None = None

    @property
    def total(self) -> int:
        return sum(part.bytes for part in self.parts)


# ------------------------------------------------------------------------------ CUDA's autocast on the CPU

# CUDA's autocast, op by op (aten/src/ATen/autocast_mode.h and .cpp: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE and the cuDNN and banned
# entries), by policy. tests/test_plan.py checks the names against the installed torch's AutocastCUDA kernels and the
# policies against CUDA's own kernels run on fake CUDA tensors.
CUDA_AUTOCAST = {
    "lower_precision_fp": (
        "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
        "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "cudnn_convolution",
        "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
        "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
        "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
        "_cudnn_rnn", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
        "native_layer_norm", "group_norm", "rms_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
        "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
        "linalg_matrix_sqrth", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
        "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
        "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
        "_upsample_bicubic2d_aa",
    ),
    # float32 through the op's dtype argument (no float32 copy of the input): softmax, sums, norms
    "fp32_set_opt_dtype": (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
    "fp32_append_dtype": ("norm.Scalar", "norm.ScalarOpt_dim"),  # redispatched to the overload with a dtype
    "promote": (
        "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
        "scatter_add",
    ),
    "banned": ("binary_cross_entropy",),
}  # fmt: skip
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_NORM_WITH_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}


@contextlib.contextmanager
def cuda_autocast_rules():
    """While active, the CPU's autocast applies CUDA's rules: the kernels of CUDA's autocast ops are replaced, for the
    CPU, by ones with CUDA's policy, and the CPU's own autocast ops that CUDA leaves alone fall through. (Fake CUDA
    tensors would run CUDA's real autocast kernels, but autograd's engine needs a GPU for their backward pass.)
    Lower-precision ops that the CPU's autocast also casts keep torch's kernels and their weight cache; the others
    (einsum, mv, RNN cells, none on the traced models' paths) cast without it."""
    library = torch.library.Library("aten", "IMPL")
    cuda_ops = {name for names in CUDA_AUTOCAST.values() for name in names}
    try:
        with warnings.catch_warnings():  # torch warns about every kernel replaced
            warnings.filterwarnings("ignore", "Overriding a previously registered kernel")
            for policy, names in CUDA_AUTOCAST.items():
                for name in names:
                    if policy == "lower_precision_fp" and _has_cpu_autocast(name):
                        continue
                    library.impl(name, _cuda_autocast_kernel(name, policy), "AutocastCPU")
            for qualified in torch._C._dispatch_get_all_op_names():
                name = qualified.removeprefix("aten::")
                if qualified.startswith("aten::") and name not in cuda_ops and _has_cpu_autocast(name):
                    library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        library._destroy()  # torch's own kernels are back


def _has_cpu_autocast(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU")


def _aten(name: str) -> torch._ops.OpOverload:
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _eligible(value) -> bool:
    """What CUDA's autocast casts: floating-point tensors but float64 ones."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype is not torch.float64


def _cuda_autocast_kernel(name: str, policy: str):
    """``name``'s kernel with CUDA's autocast ``policy``, for the CPU's autocast dispatch key. Like CUDA's, it runs the
    op with autocast off (the ops it calls are not cast again)."""
    op = _aten(name)

    def run(op, args, kwargs, dtype=None):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            if dtype is None:
                return op(*args, **kwargs)
            return op(*_cast(args, "cpu", dtype), **_cast(kwargs, "cpu", dtype))

    if policy == "lower_precision_fp":
        return lambda *args, **kwargs: run(op, args, kwargs, torch.get_autocast_dtype("cpu"))
    if policy == "fp32":
        return lambda *args, **kwargs: run(op, args, kwargs, torch.float32)
    if policy == "promote":  # the widest floating type among the inputs

        def promote(*args, **kwargs):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            widest = torch.float32 if any(_eligible(t) and t.dtype == torch.float32 for t in leaves) else None
            return run(op, args, kwargs, widest or torch.get_autocast_dtype("cpu"))

        return promote
    if policy == "fp32_set_opt_dtype":  # dtype=float32 unless given; only for a floating first input
        position = [argument.name for argument in op._schema.arguments].index("dtype")

        def set_dtype(*args, **kwargs):
            if _eligible(args[0]) and position < len(args) and args[position] is None:
                args = (*args[:position], torch.float32, *args[position + 1 :])
            elif _eligible(args[0]) and position >= len(args) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            return run(op, args, kwargs)

        return set_dtype
    if policy == "fp32_append_dtype":
        with_dtype = _aten(_NORM_WITH_DTYPE[name])
        return lambda *args, **kwargs: (
            run(with_dtype, args, {**kwargs, "dtype": torch.float32}) if _eligible(args[0]) else run(op, args, kwargs)
        )

    def banned(*args, **kwargs):
        raise RuntimeError(f"{name} is unsafe to autocast on CUDA; torch refuses it (use its _with_logits form)")

    return banned


# --------------------------------------------------------------------------------------------------- the trace


class StepTracer(torch.utils._python_dispatch.TorchDispatchMode):
    """While active: the bytes of the storages that ops allocate, followed until they are freed (and their peak, in
    all and per phase), and the FLOPs of the ops, by torch's FLOP formulas. (torch's FlopCounterMode would keep every
    output alive, which is why the counting is done here.)"""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self._phase_peak = 0
        self.flops = 0
        self.phases: dict[str, int] = {}  # the peak within each phase, in the order they were marked
        self._seen: dict[int, weakref.ref] = {}
        self._formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in _cpu_flash_attention_flops().items()}}

    def mark(self, phase: str) -> None:
        """End a phase: record its peak (unless the name is in parentheses), and start the next from what is live."""
        if not phase.startswith("("):
            self.phases[phase] = self._phase_peak
        self._phase_peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        # An output on an input's storage (in-place ops, views) allocated nothing.
        inputs = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if _is_tensor(t)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if _is_tensor(tensor) and id(tensor.untyped_storage()) not in inputs:
                self._follow(tensor.untyped_storage())
        return out

    def _follow(self, storage) -> None:
        key = id(storage)  # storages keep their Python object while they live, so the id is stable
        if key in self._seen:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._phase_peak = max(self._phase_peak, self.live)

        def released(_reference, key=key, size=size) -> None:
            self.live -= size
            self._seen.pop(key, None)

        self._seen[key] = weakref.ref(storage, released)


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _cpu_flash_attention_flops():
    """FLOP formulas for the CPU flash-attention kernels the fake trace runs (torch has only the GPU ones)."""
    aten = torch.ops.aten

    # Formulas get the shapes of the tensor arguments.
    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def _to_fake(modules: list[nn.Module]) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor of the same shape and dtype, in place; a tensor
    shared by several modules (a LoRA run's UNet) stays shared. Call inside the FakeTensorMode."""
    swapped: dict[int, torch.Tensor] = {}
    for module in modules:
        for submodule in module.modules():
            for store in (submodule._parameters, submodule._buffers):
                for name, tensor in store.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in swapped:
                        fake = torch.empty_like(tensor, device="cpu")
                        if isinstance(tensor, nn.Parameter):
                            fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        swapped[id(tensor)] = fake
                    store[name] = swapped[id(tensor)]


@dataclass
class MetaRun:
    """The run's models, built on the meta device."""

    teacher: object
    networks: object
    expert: nn.Module | None
    proxy: LatentClip | None
    cached: bool
    fake_score: FakeScore | None = None  # the matching terms' fake score network and discriminator head

    def modules(self) -> list[nn.Module]:
        found = [self.networks.student, *self.teacher.encoders()]
        if isinstance(self.networks.target, nn.Module):
            found += [self.networks.target, self.teacher.unet]
        if self.fake_score is not None:
            found += [self.fake_score.unet, *([self.fake_score.head] if self.fake_score.head is not None else [])]
        return found + [module for module in (self.expert, self.proxy) if module is not None]


def _with_random_reward_weights(config: TrainConfig) -> TrainConfig:
    """The config with ``random_weights=True`` for every reward that can build its published architecture without
    its weights (the others, the world's and pixel statistics, are small and load what ships)."""
    terms = [
        dataclasses.replace(term, kwargs={**term.kwargs, "random_weights": True})
        if "random_weights" in inspect.signature(reward_factory(term.name)).parameters
        else term
        for term in config.reward.terms
    ]
    return dataclasses.replace(config, reward=dataclasses.replace(config.reward, terms=terms))


def _build_on_meta(config: TrainConfig) -> MetaRun:
    meta = torch.device("meta")
    with meta:
        teacher = build_teacher(architecture_of(config.model.teacher, config.model.revision), config.model.teacher)
        expert = build_expert(_with_random_reward_weights(config))
        fake_score = FakeScore.build(config, teacher.unet, DTYPES[config.precision.teacher_dtype])  # before LoRA
        # Traced eagerly: torch.compile's fused kernels keep fewer activations, so a compiled run needs at most this.
        networks = build_networks(_set(config, "precision.compile", False), teacher, meta)
        proxy = None
        if config.reward.mode == "latent":
            folder = Path(config.reward.latent.model)
            proxy_config = read_model_config(folder, KIND, "make one with `rglcd lrm pretrain`")
            proxy = LatentClip(LatentClipConfig(**proxy_config))
    return MetaRun(teacher, networks, expert, proxy, is_cache(config.data.source), fake_score)


@dataclass
class Trace:
    peak: int  # bytes allocated by one step on top of the weights and optimizer states, at its peak
    phases: dict[str, int]  # the peak within each phase of the step
    flops: float  # of one optimizer step (all its micro-batches)
    outputs: dict[str, tuple]  # (shape, dtype) of what the step made: latents, model_pred, target, reward, ...


@dataclass
class _FakeStep:
    """What the traced step uses, made in the FakeTensorMode before the trace (it exists before a step runs)."""

    distillation: object
    trained: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    proxy: Proxy | None  # the proxy's trained parameters and optimizer
    uncond: torch.Tensor
    uncond_added: dict | None
    autocast: dict


def _prepare(run: MetaRun, config: TrainConfig, device: str) -> _FakeStep:
    """The run's tensors made fake, its optimizers with their states, the empty prompt's conditioning."""
    _to_fake(run.modules())
    # The schedule was built on the meta device with the models; the step indexes it (and the DDIM grid made on its
    # device) with the batch's CPU timesteps.
    schedule = run.teacher.schedule
    run.teacher.schedule = dataclasses.replace(
        schedule, alphas_cumprod=torch.empty_like(schedule.alphas_cumprod, device="cpu")
    )  # fmt: skip
    trained = trained_params(run.networks.student)
    # AdamW also for 8-bit runs (bitsandbytes need not be installed to plan): their states are counted by
    # memory_parts, and AdamW's temporaries bound 8-bit AdamW's.
    optimizer = build_optimizer(_set(config, "optim.use_8bit_adam", False), trained)
    proxy = Proxy.build(config, run.proxy) if run.proxy is not None else None
    fake_optimizer = None
    if run.fake_score is not None:  # its AdamW again, over the fake tensors that replaced the meta parameters
        fake_score = run.fake_score
        fake_params = [param for module in fake_score.checkpointed()[0].values() for param in trained_params(module)]
        fake_score.params = fake_params
        fake_score.optimizer = fake_optimizer = torch.optim.AdamW(fake_params, lr=config.dmd.fake_lr)
    for opt in filter(None, (optimizer, proxy and proxy.optimizer, fake_optimizer)):
        for group in opt.param_groups:  # torch's default on a GPU: one foreach kernel over all tensors
            group["foreach"] = device == "cuda"
        _allocate_state(opt)  # the states exist from the first step on: part of the weights, not the trace
    if config.optim.gradient_accumulation_steps > 1:  # gradients live across micro-batches, like the weights
        for param in trained:
            param.grad = torch.zeros_like(param)
    precision = config.precision.mixed_precision
    autocast = dict(device_type="cpu", dtype=DTYPES.get(precision, torch.bfloat16), enabled=precision != "no")
    uncond, uncond_added = _unconditional(run, config)
    distillation = build_distillation(config, run.teacher, run.networks.student)
    return _FakeStep(distillation, trained, optimizer, proxy, uncond, uncond_added, autocast)


def trace_step(run: MetaRun, config: TrainConfig, device: str = "cuda") -> Trace:
    """One step of ``rglcd train`` on fake tensors at the config's batch size and resolution: what it allocates
    (at its peak and per phase) and its FLOPs. ``run`` is consumed (its tensors become fake)."""
    teacher, networks, proxy = run.teacher, run.networks, run.proxy
    # The fake tensors are CPU tensors (autograd's engine needs a GPU for CUDA ones); a GPU's plan gets CUDA's rules.
    rules = cuda_autocast_rules() if device == "cuda" else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True), rules:
        fake = _prepare(run, config, device)
        generator = torch.Generator().manual_seed(0)
        live = StepTracer()
        with live:
            batch = _fake_batch(run, config)
            reward = build_student_reward(config, run.expert, proxy, teacher.vae, fake.distillation)
            fake_score = run.fake_score
            matching = fake_score.terms(config, fake.distillation) if fake_score is not None else None
            parts = StepParts(
                teacher, networks, fake.distillation, reward, (fake.uncond, fake.uncond_added), fake.proxy,
                config.data.resolution, config.distill.lcd_weight, matching,
            )  # fmt: skip
            encoded = "encode the batch (VAE encoder, text encoders)" if not run.cached else "read the cached batch"
            # Step 0: with reward.every > 1, the step that carries the reward term (and with it the peak).
            forward = training_forward(
                parts, batch, generator, 0, torch.autocast(**fake.autocast), encoded=lambda: live.mark(encoded)
            )
            output, latents = forward.output, forward.latents
            term = reward.at(0)
            sampled = f", {term.sample_target.num_steps}-step sample" if output.sample is not None else ""
            matched = ", the student's sample, real and fake scores" if matching is not None else ""
            live.mark(
                "forward: student, teacher, target" + (f"{sampled}, decoder and reward" if term else "") + matched
            )
            made = {
                "latents": latents,
                "model_pred": output.model_pred,
                "target": output.target,
                "reward": output.reward,
                "sample": output.sample,
            }
            outputs = {name: (tuple(t.shape), t.dtype) for name, t in made.items() if t is not None}
            output.loss.backward()
            live.mark("backward")
            torch.nn.utils.clip_grad_norm_(fake.trained, config.optim.max_grad_norm, foreach=device == "cuda")
            fake.optimizer.step()
            live.mark("clip gradients, optimizer step")
            if proxy is not None:  # Alg. 4's fit after the student's update, as the loop runs it
                with torch.autocast(**fake.autocast):
                    fit = fake.proxy.fit_loss(
                        config, run.expert, teacher.vae, output, latents, batch["captions"], generator
                    )
                fit.loss.backward()
                fake.proxy.optimizer.step()
                live.mark("latent proxy fit (expert on 3 latents, proxy step)")
            if fake_score is not None:  # one of the fake network's updates after the student's, as the loop runs it
                set_trainable(fake_score.params, True)
                with torch.autocast(**fake.autocast):
                    fake_loss, _ = fake_score.fit_loss(
                        config, fake.distillation, output.generated, latents, forward.cond_embeds, forward.added_cond,
                        generator,
                    )  # fmt: skip
                fake_loss.backward()
                fake_score.optimizer.step()
                fake_score.optimizer.zero_grad(set_to_none=True)
                live.mark("fake score network update" + (" with the discriminator" if fake_score.head else ""))
            del made, output, batch, latents, forward
            if config.optim.gradient_accumulation_steps == 1:
                fake.optimizer.zero_grad(set_to_none=True)
            live.mark("(the step's tensors released)")
            _ema_step(run, config)
            live.mark("EMA update")
    # FLOPs of one micro-batch; an optimizer step runs gradient_accumulation_steps of them.
    return Trace(live.peak, live.phases, live.flops * config.optim.gradient_accumulation_steps, outputs)


def _allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """One step with zero gradients: allocates the optimizer's states (AdamW: two per parameter)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _unconditional(run: MetaRun, config: TrainConfig):
    """The empty prompt's conditioning, made once before the loop (as the trainer does)."""

    batch_size, resolution = config.optim.batch_size, config.data.resolution
    with torch.no_grad():
        if run.cached:
            return torch.zeros(batch_size, run.teacher.tokenizer.model_max_length, _text_width(run.teacher)), None
        embeds, added = text_conditioning(run.teacher, [""] * batch_size, resolution)
    return embeds.float(), float_conditions(added)


def _text_width(teacher) -> int:
    """The width of a cached caption embedding: the text encoder's, or SDXL's two concatenated."""
    width = teacher.text_encoder.config.hidden_size
    return width + (teacher.text_encoder_2.config.hidden_size if teacher.is_sdxl else 0)


def _fake_batch(run: MetaRun, config: TrainConfig) -> dict:
    """A batch as the data stream gives it: images and captions, or `rglcd cache` entries."""
    batch_size, resolution = config.optim.batch_size, config.data.resolution
    captions = ["a photograph of an astronaut riding a horse on the moon"] * batch_size
    if not run.cached:
        return {"pixel_values": torch.rand(batch_size, 3, resolution, resolution) * 2 - 1, "captions": captions}
    vae, teacher = run.teacher.vae, run.teacher
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    batch = {
        "latent_parameters": torch.zeros(batch_size, 2 * vae.config.latent_channels, side, side),
        "prompt_embeds": torch.zeros(batch_size, teacher.tokenizer.model_max_length, _text_width(teacher)),
        "captions": captions,
    }
    if teacher.is_sdxl:
        batch["pooled_prompt_embeds"] = torch.zeros(batch_size, teacher.text_encoder_2.config.projection_dim)
    return batch


def _ema_step(run: MetaRun, config: TrainConfig) -> None:

    update_ema(*ema_pairs(run.networks.student, run.networks.target), config.distill.ema_decay)


# ------------------------------------------------------------------------------------------------- the plan


def _bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _describe(tensors: list[torch.Tensor], note: str = "") -> str:
    count = sum(tensor.numel() for tensor in tensors)
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors})
    return f"{count / 1e6:,.1f} M, {'/'.join(dtypes)}" + (f", {note}" if note else "")


def _adam_8bit_bytes(trained: list[torch.Tensor]) -> int:
    """bitsandbytes' AdamW8bit: two uint8 states with a float32 scale per 256-value block; tensors under 4,096
    values keep float32 states."""
    return sum(2 * p.numel() + 8 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel() for p in trained)


def memory_parts(run: MetaRun, config: TrainConfig, processes: int, sharded: bool) -> list[Part]:
    """The weights and states of a run per process, by part (exact: counted on the meta-device models)."""
    shard = processes if sharded else 1
    shard_note = f"sharded over {processes}" if sharded else ""
    student, teacher = run.networks.student, run.teacher
    trained = trained_params(student)
    parts = []
    if config.lora.rank:
        named = list(student.named_parameters())
        base = [param for name, param in named if ".lora_" not in name]
        adapters = [param for name, param in named if ".lora_" in name]
        parts.append(Part("UNet (teacher = the student's frozen base)", _describe(base), _bytes(base)))
        parts.append(Part("LoRA adapters (student + EMA target)", _describe(adapters), _bytes(adapters)))
    else:
        target, teacher_unet = list(run.networks.target.parameters()), list(teacher.unet.parameters())
        parts.append(Part("student UNet", _describe(trained, shard_note), _bytes(trained) // shard))
        parts.append(Part("EMA target UNet", _describe(target, shard_note), _bytes(target) // shard))  # as the student
        parts.append(Part("teacher UNet", _describe(teacher_unet), _bytes(teacher_unet)))
    parts.append(Part("gradients", _describe(trained, shard_note), _bytes(trained) // shard))
    if config.optim.use_8bit_adam:
        parts.append(Part("optimizer states", "8-bit AdamW", _adam_8bit_bytes(trained)))
    else:
        parts.append(Part("optimizer states", "AdamW: 2 float32 per value" + (f", {shard_note}" if sharded else ""),
                          2 * 4 * sum(p.numel() for p in trained) // shard))  # fmt: skip
    if processes > 1 and not sharded:
        parts.append(
            Part("DDP gradient buckets", "a float32 copy of the gradients", 4 * sum(p.numel() for p in trained))
        )
    for name, module in (("VAE", teacher.vae), ("text encoder", teacher.text_encoder)):
        tensors = list(module.parameters())
        parts.append(Part(name, _describe(tensors), _bytes(tensors)))
    if teacher.is_sdxl:
        tensors = list(teacher.text_encoder_2.parameters())
        parts.append(Part("text encoder 2", _describe(tensors), _bytes(tensors)))
    if run.expert is not None:
        for term, reward in zip(config.reward.terms, run.expert.rewards, strict=True):
            tensors = list(reward.parameters())
            role = "expert of the proxy" if run.proxy is not None else "reward"
            parts.append(Part(f"{role}: {term.name}", _describe(tensors), _bytes(tensors)))
    if run.proxy is not None:
        tensors = list(run.proxy.parameters())
        latent = config.reward.latent
        unlocked_proxy = run.proxy.unlock(latent.unlocked_image_groups, latent.unlocked_text_groups)
        unlocked = trained_params(unlocked_proxy)
        parts.append(Part("latent proxy RM", _describe(tensors), _bytes(tensors)))
        parts.append(Part("latent proxy: AdamW states", _describe(unlocked, "2 float32 per value"), 8 * sum(
            p.numel() for p in unlocked)))  # fmt: skip
    if run.fake_score is not None:
        fake_score = run.fake_score
        modules = fake_score.checkpointed()[0].values()
        tensors = [param for module in modules for param in module.parameters()]
        trained = [param for module in modules for param in trained_params(module)]
        kind = f"LoRA rank {config.dmd.fake_lora_rank} on a frozen copy" if config.dmd.fake_lora_rank else "whole copy"
        parts.append(Part(f"fake score network ({kind}) + head", _describe(tensors), _bytes(tensors)))
        # (its gradients live only within an update: in the trace)
        parts.append(Part("fake score network: AdamW states", _describe(trained, "2 float32 per value"),
                          8 * sum(p.numel() for p in trained)))  # fmt: skip
    return parts


def make_plan(config: TrainConfig, processes: int = 1, sharded: bool = False, device: str = "cuda") -> Plan:
    """Memory per process by part and FLOPs of one optimizer step of ``config``; no weights are read."""
    run = _build_on_meta(config)
    plan = Plan(config, processes, sharded, device, memory_parts(run, config, processes, sharded))
    gradients = 0 if config.optim.gradient_accumulation_steps > 1 else sum(
        param.numel() * 4 for param in run.networks.student.parameters() if param.requires_grad
    )  # fmt: skip
    trace = trace_step(run, config, device)
    # Without accumulation the gradients are allocated during the backward pass, inside the trace: counted above.
    activations = max(trace.peak - gradients, 0)
    plan.parts.append(Part("activations and temporaries", "traced peak of one step", activations))
    if device == "cuda":
        plan.parts += [
            Part("CUDA context, workspaces", "allowance, not traced", CUDA_CONTEXT_BYTES),
            Part("allocator fragmentation", f"allowance: {FRAGMENTATION:.0%} of activations, not traced",
                 int(FRAGMENTATION * activations)),
        ]  # fmt: skip
        if processes > 1:
            plan.parts.append(Part("NCCL buffers", "allowance, not traced", NCCL_BYTES))
    plan.flops, plan.phases, plan.trace = trace.flops, trace.phases, trace
    return plan


# ------------------------------------------------------------------------------------------------ switches


@dataclass(frozen=True)
class Switch:
    label: str
    overrides: tuple[tuple[str, object], ...]  # (section.field, value)
    retrace: bool  # changes the activations (else the last trace's activations carry over)
    sharded: bool = False  # FSDP over the processes


def _set(config: TrainConfig, dotted: str, value) -> TrainConfig:
    section, name = dotted.split(".")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})


def candidate_switches(config: TrainConfig, processes: int, sharded: bool) -> list[Switch]:
    """The config's memory switches not yet on, from the one that costs least (quality, speed) to the most."""
    precision, optim = config.precision, config.optim
    low = "bf16" if precision.mixed_precision != "fp16" else "fp16"
    found = []
    if precision.teacher_dtype == "fp32":
        found.append(Switch(f"precision.teacher_dtype={low}", (("precision.teacher_dtype", low),), retrace=False))
    if not precision.gradient_checkpointing:
        found.append(Switch("precision.gradient_checkpointing=true", (("precision.gradient_checkpointing", True),),
                            retrace=True))  # fmt: skip
    if config.reward.terms and config.reward.mode == "direct" and config.reward.decode_batch_size != 1:
        found.append(Switch("reward.decode_batch_size=1", (("reward.decode_batch_size", 1),), retrace=True))
    matching = bool(config.dmd.weight or config.gan.weight)
    if processes > 1 and not sharded and not config.lora.rank and not matching:  # (no FSDP for the fake network)
        found.append(Switch(f"FSDP over {processes} processes (docs/accelerate/fsdp.yaml)", (), False, sharded=True))
    if not optim.use_8bit_adam and not (sharded or config.lora.rank):
        found.append(Switch("optim.use_8bit_adam=true", (("optim.use_8bit_adam", True),), retrace=False))
    if matching and not config.dmd.fake_lora_rank:
        found.append(Switch("dmd.fake_lora_rank=64 (a LoRA fake score network)", (("dmd.fake_lora_rank", 64),),
                            retrace=True))  # fmt: skip
    if not config.lora.rank:
        found.append(Switch("lora.rank=64 (LCM-LoRA)", (("lora.rank", 64),), retrace=True))
    batch, accumulation = optim.batch_size, optim.gradient_accumulation_steps
    while batch > 1:  # the same global batch in more, smaller micro-batches
        batch, accumulation = (batch + 1) // 2, accumulation * 2
        found.append(Switch(
            f"optim.batch_size={batch} optim.gradient_accumulation_steps={accumulation}",
            (("optim.batch_size", batch), ("optim.gradient_accumulation_steps", accumulation)), retrace=True,
        ))  # fmt: skip
    return found


def fit_switches(plan: Plan, budget_bytes: float) -> list[tuple[Switch, Plan]]:
    """Switches applied one after another until the run fits ``budget_bytes``, each with the plan it gives."""
    steps, current = [], plan
    config, sharded = plan.config, plan.sharded
    for switch in candidate_switches(plan.config, plan.processes, plan.sharded):
        if current.total <= budget_bytes:
            break
        for dotted, value in switch.overrides:
            config = _set(config, dotted, value)
        sharded = sharded or switch.sharded
        if switch.retrace:
            after = make_plan(config, plan.processes, sharded, plan.device)
        else:  # weights and states recounted, the activations of the last trace kept
            run = _build_on_meta(config)
            parts = memory_parts(run, config, plan.processes, sharded)
            parts += [part for part in current.parts if part.name in _TRACED_PARTS]
            after = Plan(
                config, plan.processes, sharded, plan.device, parts, current.flops, current.phases, current.trace
            )
        if after.total >= current.total:  # no help here (e.g. LoRA adapters larger than a tiny UNet's layers): skipped
            config, sharded = current.config, current.sharded
            continue
        current = after
        steps.append((switch, current))
    return steps


# What a switch that changes no activations carries over from the last plan: the traced peak and its allowances.
_TRACED_PARTS = (
    "activations and temporaries", "CUDA context, workspaces", "allocator fragmentation", "NCCL buffers",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the report


def size(count: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


def seconds_per_step(plan: Plan, gpu: GPU, utilization: float) -> float:
    return plan.flops / (gpu.tflops * 1e12 * utilization)


def format_plan(
    plan: Plan, name: str, gpu_name: str, gpu: GPU, utilization: float, switches=(), memory_given: bool = False
) -> str:
    """The plan as the terminal table ``rglcd plan`` prints; ``memory_given``: the GPU's memory came from the user."""
    config = plan.config
    engine = f"FSDP over {plan.processes}" if plan.sharded else ("DDP" if plan.processes > 1 else "1 process")
    lines = [
        f"rglcd plan: {name} — teacher {config.model.teacher}, {config.data.resolution} px, batch "
        f"{config.optim.batch_size} per process × {config.optim.gradient_accumulation_steps} accumulation, {engine}, "
        f"mixed precision {config.precision.mixed_precision}, "
        + (f"LoRA rank {config.lora.rank}" if config.lora.rank else "full student")
        + ("" if plan.device == "cuda" else ", on the CPU"),
        "",
        f"{'memory per process':<46} {'what':<44} {'size':>10}",
    ]
    lines += [f"{part.name:<46} {part.detail:<44} {size(part.bytes):>10}" for part in plan.parts]
    lines.append(f"{'total':<46} {'':<44} {size(plan.total):>10}")
    budget = gpu.memory_gib * GIB
    verdict = "fits" if plan.total <= budget else "does NOT fit"
    memory = f"a GPU of {gpu.memory_gib:.4g} GiB" if memory_given else f"{gpu_name} ({gpu.memory_gib:.4g} GiB)"
    lines += ["", f"{memory}: {verdict} ({100 * plan.total / budget:.0f} % of its memory)"]
    lines += ["", "activations by phase of the step (peak within each):"]
    lines += [f"  {phase:<60} {size(peak):>10}" for phase, peak in plan.phases.items()]
    seconds = seconds_per_step(plan, gpu, utilization)
    lines += [
        "",
        f"FLOPs per optimizer step and process: {plan.flops / 1e12:,.2f} TFLOP (torch's FLOP formulas on the step)",
        f"time on {gpu_name} at {utilization:.0%} of its {gpu.tflops:g} TFLOPS: {seconds:.2f} s per step; "
        f"the paper's {PAPER_ITERATIONS:,} iterations: {seconds * PAPER_ITERATIONS / 3600:.1f} h"
        + (
            f"; this config's {config.optim.max_train_steps:,}: {seconds * config.optim.max_train_steps / 3600:.1f} h"
            if config.optim.max_train_steps != PAPER_ITERATIONS
            else ""
        ),
    ]
    if switches:
        lines += ["", "switches that make it fit, applied in order (total per process after each):"]
        for switch, after in switches:
            fits = "fits" if after.total <= budget else "does not fit"
            lines.append(f"  + {switch.label:<70} {size(after.total):>10}  {fits}")
        if switches[-1][1].total > budget:
            lines.append("  still too large: use a GPU with more memory or more processes (--processes N)")
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GiB', '80G' or '80' (GiB), or '80GB' (decimal: 80·10⁹ bytes, 74.5 GiB) -> GiB."""
    upper = text.strip().upper()
    decimal = upper.endswith("GB")
    number = upper.removesuffix("IB").removesuffix("B").removesuffix("G").strip()
    try:
        value = float(number)
    except ValueError as error:
        raise ValueError(f"--gpu-memory: {text!r} is not a size like 80GiB") from error
    if value <= 0:
        raise ValueError(f"--gpu-memory: {text!r} must be positive")
    return value * 1e9 / GIB if decimal else value
