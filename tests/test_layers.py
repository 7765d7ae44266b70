"""Dependencies inside embedtrain point one way: a module imports only from its own layer or the
layers below it, at module level and inside functions alike (a function-level import is still a
dependency; it only runs later), and no modules import each other in a circle, inside a layer
either. Read from the source with `ast`, nothing is imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "embedtrain"

# Bottom to top. A module belongs to the entry with the longest matching name ("embedtrain.model"
# covers embedtrain.model.encoder); "embedtrain" is the package's __init__ alone (it returns the
# inference layer's BiEncoder and Reranker lazily, so it sits on top), so a new top-level module must
# be given a layer here.
LAYERS = [
    (
        "foundation",
        (
            "embedtrain.version",
            "embedtrain.errors",
            "embedtrain.file_modes",
            "embedtrain.distributed",
            "embedtrain.losses",
            "embedtrain.prompts",
            "embedtrain.shape",
            "embedtrain.model",
        ),
    ),
    ("inference", ("embedtrain.inference",)),
    ("data", ("embedtrain.data",)),
    ("retrieval", ("embedtrain.retrieval", "embedtrain.token_retrieval", "embedtrain.bm25")),
    ("config", ("embedtrain.config", "embedtrain.autoconfig")),
    ("train", ("embedtrain.train", "embedtrain.kinds")),  # the kinds call train/step.py; the loop calls them
    (
        "commands",
        (
            "embedtrain.encode",
            "embedtrain.rerank",
            "embedtrain.eval",
            "embedtrain.mine",
            "embedtrain.export",
            "embedtrain.export_multi_vector",
            "embedtrain.export_files",
            "embedtrain.export_sparse",
            "embedtrain.merge",
            "embedtrain.plan",
            "embedtrain.teacher_cache",
        ),
    ),
    ("cli", ("embedtrain.cli",)),
    ("package", ("embedtrain",)),
]


def module_name(path, root=PACKAGE):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root=PACKAGE):
    """{dotted name: path} of every module of the package at `root`."""
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def layer_of(module):
    """(index, name) of the layer a module belongs to, or None for a module no layer names."""
    best = None
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "embedtrain" and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[2]):
                best = (index, name, len(prefix))
    return best and best[:2]


def imported_modules(path, modules):
    """[(line, embedtrain module)] of every import in the file, at any depth, once per line and
    module. `from embedtrain import distributed` names the submodule (one of `modules`); `from
    embedtrain import BiEncoder` the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "embedtrain"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "embedtrain":
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.append((node.lineno, submodule if submodule in modules else node.module))
    return sorted(set(found))


def upward_imports(modules, root=PACKAGE):
    """'file:line (layer) imports module (layer)' for every import of a module from a higher layer
    (or from a module no layer names)."""
    found = []
    for name, path in modules.items():
        own_index, own_layer = layer_of(name)
        where = path.relative_to(root.parent)
        for line, imported in imported_modules(path, modules):
            target = layer_of(imported)
            if target is None:
                found.append(f"{where}:{line} ({own_layer}) imports {imported}, which is in no layer")
            elif target[0] > own_index:
                found.append(f"{where}:{line} ({own_layer}) imports {imported} ({target[1]})")
    return found


def import_circles(modules, root=PACKAGE):
    """One line per import circle among `modules` (a strongly connected component of the import
    graph, module- and function-level imports alike): a closed path through it, each step with the
    file and line of its import, e.g. 'embedtrain.a -> embedtrain.b (embedtrain/a.py:4) ->
    embedtrain.a (embedtrain/b.py:1)', then the component's modules the path does not pass."""
    edges = {}  # module -> {imported module: first line}
    for name, path in modules.items():
        edges[name] = {}
        for line, imported in imported_modules(path, modules):
            if imported in modules and imported != name:
                edges[name].setdefault(imported, line)
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    circles = []
    for component in components:
        path = closed_path(sorted(component)[0], component, edges, modules, root)
        others = sorted(name for name in component if f"{name} (" not in path)
        circles.append(path + (f"; also in the circle: {', '.join(others)}" if others else ""))
    return circles


def closed_path(start, component, edges, modules, root):
    """A shortest path from `start` back to itself inside `component`, as import_circles writes it."""
    parents, frontier = {}, [start]
    while start not in parents:
        following = []
        for node in frontier:
            for target in sorted(edges[node]):
                if target in component and target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    steps, node = [], start
    while True:
        source = parents[node]
        steps.append(f"{node} ({modules[source].relative_to(root.parent)}:{edges[source][node]})")
        node = source
        if node == start:
            break
    return " -> ".join([start, *reversed(steps)])


def test_every_module_has_a_layer():
    modules = package_modules()
    assert "embedtrain.cli" in modules and "embedtrain.model.encoder" in modules
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    violations = upward_imports(package_modules())
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from embedtrain import distributed\n", ["embedtrain.distributed"]),
        ("def f():\n    from embedtrain.eval import metrics, with_mean\n", ["embedtrain.eval"]),
        ("import embedtrain.train.loop as loop\n", ["embedtrain.train.loop"]),
        ("from embedtrain import BiEncoder\nimport json\n", ["embedtrain"]),
    ],
)
def test_imports_are_found_at_every_depth(tmp_path, source, expected):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert [module for _, module in imported_modules(path, package_modules())] == expected


def test_no_modules_import_each_other_in_a_circle():
    circles = import_circles(package_modules())
    assert not circles, "import circles (each a closed path of imports):\n" + "\n".join(circles)


def test_a_circle_through_a_function_level_import_is_named(tmp_path):
    root = tmp_path / "embedtrain"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("import json\n\n\ndef f():\n    from embedtrain.b import g\n")
    (root / "b.py").write_text("from embedtrain import a\n")
    (root / "c.py").write_text("from embedtrain import a, b\n")  # imports the circle, is not in it
    assert import_circles(package_modules(root), root) == [
        "embedtrain.a -> embedtrain.b (embedtrain/a.py:5) -> embedtrain.a (embedtrain/b.py:1)"
    ]


def test_a_module_outside_the_layers_is_noticed():
    assert layer_of("embedtrain.something_new") is None and layer_of("embedtrain")[1] == "package"


def test_an_upward_import_is_named_with_its_file_and_line(tmp_path):
    root = tmp_path / "embedtrain"
    (root / "train").mkdir(parents=True)
    for name in ("__init__.py", "eval.py", "train/__init__.py"):
        (root / name).write_text("")
    (root / "train" / "evaluation.py").write_text(
        "from embedtrain import distributed\n\n\ndef f():\n    from embedtrain.eval import metrics\n"
    )
    (root / "distributed.py").write_text("")
    assert upward_imports(package_modules(root), root) == [
        "embedtrain/train/evaluation.py:5 (train) imports embedtrain.eval (commands)"
    ]
