"""The package's shape: layers that point one way, the world as a leaf plugin, registries a plugin can fill."""

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

import rglcd.plugins
from rglcd.eval_command import METRICS, EvalSettings, build_metrics, register_metric
from rglcd.losses import DISTANCES, ConsistencyDistance
from rglcd.prompts import PROMPT_SETS, load_prompts, prompt_set
from rglcd.rewards import REWARDS

SRC = Path(__file__).resolve().parents[1] / "src"
PURE_MATH = {"rglcd.schedules", "rglcd.losses", "rglcd.step"}
# The layers, bottom first; a module may import its own layer's and the layers below (rglcd.plugins and
# rglcd.files are helpers every layer may use).
LAYERS = [
    {
        "rglcd.schedules",
        "rglcd.losses",
        "rglcd.step",
        "rglcd.plugins",
        "rglcd.files",
        "rglcd.gpus",
        "rglcd.metrics",
        "rglcd.grid",
        "rglcd.devices",
        "rglcd.errors",
    },
    {"rglcd.models", "rglcd.tiny", "rglcd.architectures", "rglcd.lora"},
    {"rglcd.rewards", "rglcd.data"},
    {"rglcd.config", "rglcd.train", "rglcd.sampling", "rglcd.export", "rglcd.plan", "rglcd.lrm", "rglcd.fitting"},
    {"rglcd.evaluate", "rglcd.eval_command", "rglcd.prompts", "rglcd.report", "rglcd.serve"},
    {"rglcd.world"},
    {"rglcd.experiments", "rglcd.cli", "rglcd.__main__", "rglcd"},
]


def module_imports() -> dict[str, set[str]]:
    """Each rglcd module's rglcd imports (module level and inside functions), by absolute name."""
    found = {}
    for path in (SRC / "rglcd").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[:-1]  # what a relative import counts from (an __init__ is its own package)
        name = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                targets.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rglcd"):
                targets.add(node.module)
        found[name] = {target for target in targets if target != name}
    return found


def unit(module: str) -> str:
    """The layer unit of a module: ``rglcd.x`` for ``rglcd.x.y``."""
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    (index,) = [i for i, layer in enumerate(LAYERS) if unit(module) in layer]
    return index


def test_every_module_has_a_layer_and_imports_only_its_layer_and_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in module_imports().items()
        for target in targets
        if unit(module) != unit(target) and layer_of(target) > layer_of(module)
    ]
    assert not upward, upward


def test_pure_math_imports_no_models():
    for module in PURE_MATH:
        # rglcd.devices: the host-to-device copy of the step's drawn noise (no I/O, no models)
        assert module_imports()[module] <= PURE_MATH | {"rglcd.plugins", "rglcd.devices"}, module


def test_no_import_cycle_between_packages():
    graph = {}
    for module, targets in module_imports().items():
        graph.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    done, path = set(), []

    def visit(node):
        assert node not in path, " -> ".join([*path[path.index(node) :], node])
        if node in done:
            return
        path.append(node)
        for child in graph.get(node, ()):
            visit(child)
        path.pop()
        done.add(node)

    for node in list(graph):
        visit(node)


def test_only_the_top_layer_imports_the_world():
    importers = {
        module
        for module, targets in module_imports().items()
        if any(unit(t) == "rglcd.world" for t in targets) and unit(module) not in ("rglcd.world", "rglcd.experiments")
    }
    assert importers <= {"rglcd.cli"}, importers


def test_the_world_registers_through_its_entry_point():
    (world,) = [e for e in importlib.metadata.entry_points(group=rglcd.plugins.PLUGIN_GROUP) if e.name == "world"]
    assert world.value == "rglcd.world.plugin"
    assert {"world-clip", "world-aesthetic"} <= set(REWARDS.names())
    assert "world" in PROMPT_SETS and "judge" in METRICS
    assert prompt_set("world:4").metrics == ("world-clip", "judge", "fid", "hf_ratio")


def test_a_plugin_registers_a_reward_a_distance_a_prompt_set_and_a_metric(monkeypatch, tmp_path):
    """What docs/extending.md shows: an installed package's entry point module, imported on first lookup."""
    (tmp_path / "my_rglcd_plugin.py").write_text(
        "import torch\n"
        "from rglcd.rewards import RewardModel, register_reward\n"
        "from rglcd.losses import register_distance\n"
        "from rglcd.prompts import Prompt, register_prompt_set\n"
        "from rglcd.eval_command import register_metric\n"
        "@register_reward('brightness')\n"
        "class Brightness(RewardModel):\n"
        "    def forward(self, images, prompts):\n"
        "        return images.mean(dim=(1, 2, 3))\n"
        "@register_distance('l1')\n"
        "def l1(diff, c):\n"
        "    return diff.abs().mean(dim=1)\n"
        "@register_prompt_set('colours', metrics=('brightness',))\n"
        "def colours(argument):\n"
        "    return [Prompt(f'a {colour} square') for colour in ('red', 'blue')]\n"
        "@register_metric('darkness', 'one minus the mean pixel')\n"
        "def darkness(metrics, request):\n"
        "    metrics.per_image['darkness'] = lambda images, texts, records: 1 - images.mean(dim=(1, 2, 3))\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # imported by the first lookup, after the registries are copied
    entry = importlib.metadata.EntryPoint("mine", "my_rglcd_plugin", rglcd.plugins.PLUGIN_GROUP)
    monkeypatch.setattr(rglcd.plugins, "entry_points", lambda group: [entry])
    monkeypatch.setattr(rglcd.plugins, "_plugins_loaded", False)
    registries = {"brightness": REWARDS, "l1": DISTANCES, "colours": PROMPT_SETS, "darkness": METRICS}
    for registry in registries.values():  # the plugin registers into copies, dropped after the test
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    for name, registry in registries.items():
        assert name in registry  # the first lookup imports the plugin
    sys.modules.pop("my_rglcd_plugin")  # (a later test imports nothing stale)
    images = torch.full((2, 3, 4, 4), 0.25)
    assert ConsistencyDistance("l1")(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [1.0, 1.0]
    assert [p.text for p in load_prompts("colours")] == ["a red square", "a blue square"]
    assert prompt_set("colours").metrics == ("brightness",)
    metrics = build_metrics(["brightness", "darkness"], load_prompts("colours"), EvalSettings(models=[]))
    assert metrics.per_image["brightness"](images, ["a", "b"], [None, None]).tolist() == [0.25, 0.25]
    assert metrics.per_image["darkness"](images, ["a", "b"], [None, None]).tolist() == [0.75, 0.75]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="metric 'hf_ratio' is registered twice"):
        register_metric("hf_ratio", "again")(lambda metrics, request: None)
