"""The package's shape: layers that point one way, the world as a leaf plugin, registries a plugin can fill."""

import ast
import functools
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
PURE_MATH = {"rglcd.schedules", "rglcd.losses", "rglcd.matching", "rglcd.step"}
# The layers, bottom first: each line the units of one layer (``rglcd.x`` and everything under it, written ``x``;
# ``rglcd`` is the package's own __init__). A unit imports only units of lower layers, and sits at the lowest layer
# that allows: 1 + the highest layer it imports, 0 if it imports none. test_the_layers_are_the_longest_import_chains
# checks this list against the imports and, when they differ, prints the list they give.
LAYERS = [
    "rglcd devices errors files fitting gpus grid lora metrics plugins presets schedules stats tiny",
    "losses matching models prompts",
    "architectures data sampling step",
    "rewards",
    "config lrm",
    "export",
    "evaluate train",
    "fid plan report",
    "eval_command",
    "serve world",
    "experiments",
    "cli",
    "__main__",
]


# ------------------------------------------------------------------------------------------- reading the imports


def read_imports(root: Path, package: str = "rglcd") -> dict[str, set[str]]:
    """Each module of ``root/package``'s imports of ``package`` modules, by absolute name, wherever they stand
    (module level, in functions, under ``if``): ``from x import y`` (``x.y`` where that is a submodule), relative
    imports (``from . import name`` of a submodule too), ``import x`` and ``import x as y``, and calls of
    ``import_module``, ``importlib.import_module``, ``__import__`` and ``importlib.resources.files`` with a constant
    name (relative names resolved against a constant package or ``__package__``). A computed name cannot be read.
    """
    paths = sorted((root / package).rglob("*.py"))
    names = {path: _module_name(path.relative_to(root)) for path in paths}
    modules = set(names.values())
    found = {}
    for path, name in names.items():
        # What a relative import counts from: the module's package (an __init__ is its own package).
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, here)
                for alias in node.names:  # ``from x import y``: the submodule x.y where there is one, else x
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
                target = _constant(node.args[0])
                if target is not None and target.startswith("."):
                    relative_to = _constant(node.args[1]) if len(node.args) > 1 else None
                    if len(node.args) > 1 and isinstance(node.args[1], ast.Name) and node.args[1].id == "__package__":
                        relative_to = ".".join(here)
                    level = len(target) - len(target.lstrip("."))
                    target = _resolve(target[level:], level, relative_to.split(".")) if relative_to else None
                if target is not None:
                    targets.add(target)
        found[name] = {t for t in targets if t != name and (t == package or t.startswith(package + "."))}
    return found


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, level: int, here: list[str]) -> str:
    """The absolute name of ``from {'.' * level}{module} import ...`` in package ``here`` (level 0: absolute)."""
    if not level:
        return module
    if level > len(here):
        raise ValueError(f"relative import beyond the top package: {'.' * level}{module} in {'.'.join(here)}")
    return ".".join(here[: len(here) - level + 1] + ([module] if module else []))


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__"):
        return True
    # importlib.resources.files("rglcd.presets") imports that package
    owner = func.value if isinstance(func, ast.Attribute) else None
    owner_name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else None
    return name == "files" and owner_name == "resources"


def _constant(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def unit(module: str) -> str:
    """The layer unit of a module: ``rglcd.x`` for ``rglcd.x.y``; ``rglcd`` for the package's own __init__."""
    return ".".join(module.split(".")[:2])


def unit_graph(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each unit's imports of other units (imports within a unit are free)."""
    graph = {unit(module): set() for module in imports}
    for module, targets in imports.items():
        graph[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
    return graph


def longest_chains(graph: dict[str, set[str]]) -> list[set[str]]:
    """The layering the imports give, bottom first: a unit's layer is 1 + the highest layer among the units it
    imports (0 if none), i.e. the length of its longest import chain. An import cycle has none: AssertionError."""
    layer_of: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> int:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node) :], node])
        if node not in layer_of:
            path.append(node)
            layer_of[node] = 1 + max((visit(child) for child in sorted(graph.get(node, ()))), default=-1)
            path.pop()
        return layer_of[node]

    for node in sorted(graph):
        visit(node)
    layers: list[set[str]] = [set() for _ in range(1 + max(layer_of.values(), default=-1))]
    for node, index in layer_of.items():
        layers[index].add(node)
    return layers


def parse_layers(lines: list[str], package: str = "rglcd") -> list[set[str]]:
    return [{name if name == package else f"{package}.{name}" for name in line.split()} for line in lines]


def format_layers(layers: list[set[str]], package: str = "rglcd") -> str:
    """``layers`` as LAYERS is written, to paste over it."""
    short = [
        sorted((u.removeprefix(package + ".") for u in layer), key=lambda n: (n != package, n)) for layer in layers
    ]
    return "LAYERS = [\n" + "".join(f'    "{" ".join(names)}",\n' for names in short) + "]"


def layer_violations(imports: dict[str, set[str]], declared: list[set[str]]) -> list[str]:
    """What is wrong with ``declared`` (bottom first) for these imports: units without a layer or with several,
    listed units that do not exist, imports that do not point to a lower layer, units above the lowest layer their
    imports allow. None of these ⇔ ``declared`` is the layering of the longest import chains."""
    problems = []
    layer_of: dict[str, int] = {}
    for index, layer in enumerate(declared):
        for name in sorted(layer):
            if name in layer_of:
                problems.append(f"{name} is listed in layers {layer_of[name]} and {index}")
            layer_of.setdefault(name, index)
    graph = unit_graph(imports)
    problems += [f"{name} has no layer: list it in LAYERS" for name in sorted(graph.keys() - layer_of.keys())]
    problems += [f"{name} is listed but no module of it exists" for name in sorted(layer_of.keys() - graph.keys())]
    for module, targets in sorted(imports.items()):
        for target in sorted(targets):
            here, there = unit(module), unit(target)
            if here == there or here not in layer_of:
                continue
            if there not in layer_of:
                if there not in graph:
                    problems.append(f"{module} imports {target}, which does not exist")
            elif layer_of[there] >= layer_of[here]:
                problems.append(
                    f"{module} (layer {layer_of[here]}) imports {target} (layer {layer_of[there]}): imports must "
                    "point to a lower layer"
                )
    for name, targets in sorted(graph.items()):
        placed = [(layer_of[t], t) for t in targets if t in layer_of]
        if name not in layer_of or len(placed) < len(targets):
            continue
        highest, top = max(placed, default=(-1, None))
        if highest < layer_of[name] - 1:
            why = f"its highest import, {top}, is at layer {highest}" if top else "it imports no other unit"
            problems.append(f"{name} sits at layer {layer_of[name]} but {why}: it belongs at layer {highest + 1}")
    return problems


@functools.cache
def _rglcd_imports() -> dict[str, frozenset[str]]:
    return {module: frozenset(targets) for module, targets in read_imports(SRC).items()}


def module_imports() -> dict[str, set[str]]:
    """Each rglcd module's rglcd imports (every form, anywhere in the module), by absolute name."""
    return {module: set(targets) for module, targets in _rglcd_imports().items()}


# ----------------------------------------------------------------------------------------------------- the layers


def test_the_layers_are_the_longest_import_chains():
    imports = module_imports()
    problems = layer_violations(imports, parse_layers(LAYERS))
    try:
        computed = format_layers(longest_chains(unit_graph(imports)))
    except AssertionError as cycle:
        computed = f"(none: {cycle})"
    assert not problems and parse_layers(LAYERS) == longest_chains(unit_graph(imports)), (
        "\n".join(problems) + "\n\nThe imports give these layers, bottom first (paste over LAYERS in "
        f"tests/test_layout.py, and mend the Layout section of README.md):\n{computed}"
    )


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# A fake rglcd: world (layer 1) reaches files (layer 0); low.py, at layer 0, imports the world in each form.
FAKE_LAYERS = ["rglcd files low", "world"]
FAKE_TREE = {"rglcd/__init__.py": "", "rglcd/files.py": "", "rglcd/world/__init__.py": "from ..files import x\n"}


@pytest.mark.parametrize(
    "statement",
    [
        "import rglcd.world",
        "import rglcd.world as w",
        "import rglcd.world.plugin",
        "from rglcd import world",
        "from . import world",
        "from .world import plugin",
        "from .world.plugin import thing",
        "import importlib\ndef later():\n    importlib.import_module('rglcd.world')",
        "from importlib import import_module\nif True:\n    import_module('rglcd.world.plugin')",
        "import importlib\nimportlib.import_module('.world', 'rglcd')",
        "import importlib\nimportlib.import_module('.world', __package__)",
        "__import__('rglcd.world')",
        "from importlib import resources\nresources.files('rglcd.world')",
    ],
)
def test_a_planted_upward_import_is_caught(tmp_path, statement):
    root = _plant(tmp_path, {**FAKE_TREE, "rglcd/world/plugin.py": "", "rglcd/low.py": statement + "\n"})
    imports = read_imports(root)
    assert {unit(target) for target in imports["rglcd.low"]} == {"rglcd.world"}
    (problem,) = layer_violations(imports, parse_layers(FAKE_LAYERS))
    assert problem.startswith("rglcd.low (layer 0) imports rglcd.world") and "lower layer" in problem, problem
    assert not layer_violations(read_imports(_plant(tmp_path, {"rglcd/low.py": ""})), parse_layers(FAKE_LAYERS))


def test_from_a_package_import_a_submodule_reads_the_submodule(tmp_path):
    root = _plant(
        tmp_path,
        {
            **FAKE_TREE,
            "rglcd/world/plugin.py": "from . import render, CONSTANT\nfrom .. import files, __version__\n",
            "rglcd/world/render.py": "",
        },
    )
    assert read_imports(root)["rglcd.world.plugin"] == {"rglcd.world.render", "rglcd.world", "rglcd.files", "rglcd"}


def test_imports_within_a_layer_an_unlisted_unit_and_a_unit_too_high_are_caught(tmp_path):
    root = _plant(tmp_path, {**FAKE_TREE, "rglcd/low.py": "from .files import x\n", "rglcd/new.py": ""})
    problems = layer_violations(read_imports(root), parse_layers(FAKE_LAYERS))
    assert problems == [
        "rglcd.new has no layer: list it in LAYERS",
        "rglcd.low (layer 0) imports rglcd.files (layer 0): imports must point to a lower layer",
    ]
    too_high = parse_layers(["rglcd files low new", "", "world"])  # world's highest import is at layer 0
    assert layer_violations(read_imports(root), too_high) == [
        "rglcd.low (layer 0) imports rglcd.files (layer 0): imports must point to a lower layer",
        "rglcd.world sits at layer 2 but its highest import, rglcd.files, is at layer 0: it belongs at layer 1",
    ]
    assert format_layers(longest_chains(unit_graph(read_imports(root)))) == (
        'LAYERS = [\n    "rglcd files new",\n    "low world",\n]'
    )


# --------------------------------------------------------------------------------------------- the rest of the shape


def test_pure_math_imports_no_models():
    for module in PURE_MATH:
        # rglcd.devices: the host-to-device copy of the step's drawn noise (no I/O, no models)
        assert module_imports()[module] <= PURE_MATH | {"rglcd.plugins", "rglcd.devices"}, module


def test_no_import_cycle_between_units():
    longest_chains(unit_graph(module_imports()))  # an AssertionError naming the cycle if there is one


def test_only_the_top_layers_import_the_world():
    """The CLI and the experiments import the world; the rest of rglcd reaches it through the plugin registries."""
    importers = {
        unit(module)
        for module, targets in module_imports().items()
        if unit(module) != "rglcd.world" and any(unit(t) == "rglcd.world" for t in targets)
    }
    assert importers <= {"rglcd.cli", "rglcd.experiments"}, importers


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
