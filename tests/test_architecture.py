"""The package's shape and its extension points: a third-party method end to end, configuration from one source,
module state that follows the module, and layers that import only downwards."""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import anomalens
from anomalens.cli import main
from anomalens.nn.memory import NearestNeighbourMemory
from anomalens.nn.state import EmbeddingCache

from conftest import TINY_CONFIGS, tiny_detector

SRC = Path(anomalens.__file__).resolve().parent

TOY_METHOD = '''
"""A third-party method living outside anomalens: the anomaly map is each pixel's distance from the references'
mean colour, the score its maximum."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import anomalens


@dataclass
class MeanColourConfig(anomalens.DetectorConfig):
    method: ClassVar[str] = "mean_colour"

    batch_size: int = 2  # images per forward pass


@anomalens.register_method
class MeanColour(anomalens.Detector):
    method_name = "mean_colour"
    config_class = MeanColourConfig
    zero_shot, few_shot = False, True

    def __init__(self, config, *, weights_dir=None, load_pretrained=True):
        super().__init__(config, weights_dir=weights_dir, load_pretrained=load_pretrained)
        self.register_buffer("mean_colour", torch.zeros(3))

    def _fit(self, reference_images, class_name):
        pixels = np.concatenate([image.reshape(-1, 3) for image in reference_images]).astype(np.float64)
        self.mean_colour.copy_(torch.from_numpy(pixels.mean(0)))

    def _predict_batch(self, images):
        size = min(min(image.shape[:2]) for image in images)
        maps = []
        for image in images:
            pixels = torch.from_numpy(image[:size, :size].astype(np.float32))
            maps.append((pixels - self.mean_colour.float()).norm(dim=-1))
        maps = torch.stack(maps)
        return maps.flatten(1).amax(1), maps
'''


def _import_toy(tmp_path: Path):
    path = tmp_path / "thirdparty" / "mean_colour.py"
    path.parent.mkdir()
    path.write_text(TOY_METHOD)
    spec = importlib.util.spec_from_file_location("mean_colour_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_method(tmp_path):
    module = _import_toy(tmp_path)
    yield module
    from anomalens import registry

    registry._REGISTERED.pop("mean_colour", None)
    sys.modules.pop("mean_colour_plugin", None)


def _solid(path: Path, colour, size=(6, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), colour, dtype=np.uint8)).save(path)
    return path


def test_a_third_party_method_runs_through_predict(toy_method, tmp_path, capsys):
    references = [_solid(tmp_path / "refs" / f"{i}.png", (100 + 10 * i, 100, 100)) for i in range(3)]
    grey = _solid(tmp_path / "in" / "grey.png", (110, 100, 100))
    red = _solid(tmp_path / "in" / "red.png", (250, 0, 0))
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "in"), "--method", "mean_colour", "--reference", str(tmp_path / "refs"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = {Path(row["path"]).name: row for row in csv.DictReader(open(out / "scores.csv"))}
    # Independent: the references' mean colour is (110, 100, 100); distances by hand.
    assert float(rows["grey.png"]["score"]) == pytest.approx(0.0, abs=1e-4)
    assert float(rows["red.png"]["score"]) == pytest.approx(float(np.linalg.norm([140, -100, -100])), rel=1e-5)
    # Leave-one-out threshold by hand: red channels 100, 110, 120; leaving out 100 (or 120) puts the others' mean
    # at 115 (or 105), 15 away; leaving out 110 puts it at 110, 0 away. The threshold is the largest: 15.
    assert float(rows["red.png"]["threshold"]) == pytest.approx(15.0, rel=1e-5)
    assert rows["red.png"]["label"] == "anomalous" and rows["grey.png"]["label"] == "normal"
    assert json.loads((out / "errors.jsonl").read_text().splitlines()[0])["path"].endswith("broken.png")
    assert grey.exists() and red.exists()
    saved = toy_method.MeanColour.load  # save/load round trip through the registry
    detector = anomalens.create("mean_colour").fit([np.array(Image.open(path)) for path in references])
    detector.save(tmp_path / "saved")
    assert isinstance(saved(tmp_path / "saved"), toy_method.MeanColour)


def test_a_method_without_a_detector_config_is_refused():
    class Plain(anomalens.Detector):
        method_name = "plain_config"
        config_class = dict

    with pytest.raises(ValueError, match="config_class must be a dataclass subclassing .*DetectorConfig"):
        anomalens.register_method(Plain)


def test_common_fields_are_validated_in_one_place_with_the_method_named():
    with pytest.raises(ValueError, match=r"patchcore option batch_size=0 must be an integer >= 1"):
        anomalens.create("patchcore", **{**TINY_CONFIGS["patchcore"], "batch_size": 0})
    with pytest.raises(ValueError, match=r"winclip option precision='half' must be one of float32, bfloat16"):
        anomalens.create("winclip", **{**TINY_CONFIGS["winclip"], "precision": "half"})
    with pytest.raises(ValueError, match=r"dual_image_clip option temperature=-1.0 must be > 0 or None"):
        anomalens.create("dual_image_clip", **{**TINY_CONFIGS["dual_image_clip"], "temperature": -1})


def test_every_method_config_shares_the_base_fields():
    base = {field.name for field in dataclasses.fields(anomalens.DetectorConfig)}
    for method in anomalens.list_methods():
        fields = {field.name for field in dataclasses.fields(anomalens.get_method(method).config_class)}
        assert base <= fields, method


def test_vlmdiff_does_not_change_the_callers_config():
    from anomalens.methods.vlmdiff.detector import VLMDiffConfig

    options = {key: value for key, value in TINY_CONFIGS["vlmdiff"].items() if key != "architecture"}
    config = VLMDiffConfig(**options)
    detector = anomalens.get_method("vlmdiff")(config, load_pretrained=False)
    assert config.architecture is None and detector.config.architecture is not None


# ---------------------------------------------------------------------------------------------------- the CLI
def test_config_file_print_config_and_overrides(tmp_path, capsys):
    config = tmp_path / "predict.yaml"
    config.write_text(yaml.safe_dump({"method": "patchcore", "set": ["image_size=32"], "raw-format": "png16"}))
    code = main(["predict", "in/", "--config", str(config), "--out", "runs/x", "--raw-format", "npy", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert printed["method"] == "patchcore" and printed["set"] == ["image_size=32"] and printed["out"] == "runs/x"
    assert printed["raw_format"] == "npy"  # the command line beats the file
    assert printed["overlays"] is True and printed["engine"] == "local"  # defaults, written once in the dataclasses
    config.write_text(yaml.safe_dump({"method": "patchcore", "colour": "red"}))
    assert main(["predict", "in/", "--config", str(config), "--out", "x"]) == 2
    error = capsys.readouterr().err
    assert "unknown option(s) ['colour']" in error and "raw_format" in error


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["predict", "--help"]])
def test_help_and_list_import_neither_torch_nor_training_code(argv):
    """The top-level help and ``list`` read names only; a command's help imports only its own option classes
    (``predict``'s are torch-free too). Run in a fresh interpreter, which is what a user starts."""
    script = (f"import sys\nfrom anomalens.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
              "print(sorted(name for name in sys.modules if name == 'torch' or name.endswith('.training')))")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip().splitlines()[-1] == "[]", completed.stdout


def _comment_lines(cls) -> list[str]:
    """The comments of a dataclass body that document fields, read independently of the help generator: every
    comment token outside the methods, at any depth, except those of (or right above) a ``ClassVar`` and formatter
    pragmas."""
    import inspect
    import io
    import tokenize

    source = inspect.getsource(cls)
    lines = source.splitlines()
    methods = [range(node.lineno, node.end_lineno + 1) for node in ast.walk(ast.parse(source))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]  # fmt: skip
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        text = token.string.lstrip("# ").strip()
        if token.type != tokenize.COMMENT or text.startswith(("fmt:", "noqa", "type:")):
            continue
        if any(token.start[0] in lines_of for lines_of in methods):
            continue
        statement = next((line for line in lines[token.start[0] - 1 :] if not line.strip().startswith("#")), "")
        if "ClassVar" not in statement:
            found.append(text)
    return found


def test_no_option_help_is_cut_short():
    """Every comment in an options dataclass reaches the help of one of its options (a comment wrapped onto a
    second line used to be dropped), and every option has help."""
    from anomalens.cli.options import field_comments
    from anomalens.cli.parser import COMMANDS, build_parser

    build_parser()  # every command's options build
    classes = {cls for command in COMMANDS.values() for cls in command.option_classes().values()}
    classes |= {field.type if isinstance(field.type, type) else None for cls in list(classes)
                for field in dataclasses.fields(cls) if dataclasses.is_dataclass(field.type)} - {None}  # fmt: skip
    for cls in sorted(classes, key=lambda item: item.__name__):
        helps = field_comments(cls)
        text = " ".join(helps.values())
        for field in dataclasses.fields(cls):
            assert helps.get(field.name) or field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and klass is not object:
                for line in _comment_lines(klass):
                    assert line in text, f"{klass.__name__}: comment {line!r} reaches no option's help"


def test_choices_come_from_the_declarations(capsys):
    from anomalens.cli.parser import build_parser
    from anomalens.thresholds import CALIBRATIONS

    with pytest.raises(SystemExit):
        build_parser(only="predict").parse_args(["predict", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and words at their hyphens)
    assert "".join(f"(one of: {', '.join(CALIBRATIONS)})".split()) in help_text and "k-fold" in help_text
    with pytest.raises(SystemExit):
        build_parser(only="benchmark").parse_args(["benchmark", "--help"])
    assert "(oneof:folder,mvtec,realiad,visa)" in "".join(capsys.readouterr().out.split())


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"anomalens {anomalens.__version__}"


def test_reference_that_swallows_the_inputs_gets_a_clear_error(tmp_path, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    assert main(["predict", "--method", "patchcore", "--out", str(tmp_path / "o"), "--reference", str(refs), "in"]) == 2
    error = capsys.readouterr().err
    assert "no inputs to score (--reference took" in error and "-- incoming/" in error


def test_inputs_may_stand_between_the_options_and_unknown_options_are_refused(capsys):
    from anomalens.cli.parser import parse

    _, options, _ = parse(["predict", "a/", "--method", "patchcore", "--set", "k=1", "b.png", "--out", "o", "c/"])
    assert options.inputs == ["a/", "b.png", "c/"] and options.method.set == ("k=1",)
    with pytest.raises(SystemExit):
        parse(["predict", "a/", "--method", "patchcore", "--colour", "red", "--out", "o"])
    assert "unrecognized arguments: --colour red" in capsys.readouterr().err


def test_every_training_option_is_reachable(capsys):
    from anomalens.cli.parser import build_parser
    from anomalens.methods.vlmdiff.architecture import VLMDiffArchitecture
    from anomalens.methods.vlmdiff.training import VLMDiffTrainConfig

    parser = build_parser()
    vlmdiff = parser._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0].choices["vlmdiff"]
    dests = {action.dest for action in vlmdiff._actions}
    for field in dataclasses.fields(VLMDiffTrainConfig):
        if field.name != "architecture":
            assert field.name in dests, field.name
    for field in dataclasses.fields(VLMDiffArchitecture):
        assert f"architecture.{field.name}" in dests, field.name


# ---------------------------------------------------------------------------------------------------- state
def test_embedding_cache_follows_the_module_and_is_never_saved():
    holder = torch.nn.Module()
    holder.cache = EmbeddingCache()
    holder.cache.put(("bottle", 1), torch.ones(2, 3), torch.tensor([1, 0]))
    holder.to(torch.float64)
    states, mask = holder.cache.get(("bottle", 1))
    assert states.dtype == torch.float64 and mask.dtype == torch.int64  # masks keep their integer type
    assert holder.state_dict() == {}
    holder.cache.clear()
    assert ("bottle", 1) not in holder.cache and not list(holder.buffers())


def test_clip_prompt_embeddings_follow_to_and_are_dropped_on_load():
    detector = tiny_detector("winclip").fit(None, class_name="widget")
    cached = detector.clip.text_cache
    assert len(cached) == 1
    detector.to(torch.float64)
    assert all(tensor.dtype == torch.float64 for tensor in cached.buffers())
    detector.to(torch.float32)
    detector.load_state_dict(detector.state_dict())
    assert len(cached) == 0  # new weights: the prompts are encoded again on the next call


def test_a_memory_bank_of_any_size_loads_with_plain_load_state_dict():
    fitted = NearestNeighbourMemory("l2")
    fitted.fit(torch.randn(37, 5))
    fresh = NearestNeighbourMemory("l2")
    fresh.load_state_dict(fitted.state_dict())
    queries = torch.randn(4, 5)
    expected = torch.cdist(queries, fitted.bank).min(1).values  # brute force
    torch.testing.assert_close(fresh.search(queries)[0][:, 0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- layers
def _parts() -> list[str]:
    """Every top-level module and package of anomalens (the package's own __init__ and __main__ aside)."""
    return sorted(path.stem if path.is_file() else path.name for path in SRC.iterdir()
                  if (path.suffix == ".py" and path.stem not in ("__init__", "__main__"))
                  or (path.is_dir() and (path / "__init__.py").exists()))  # fmt: skip


def _imports(path: Path) -> set[str]:
    """Every anomalens module ``path`` imports at run time (function-level imports too; not ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop type-checking-only blocks
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anomalens."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("anomalens."))
    return names


def _files(part: str) -> list[Path]:
    return sorted((SRC / part).rglob("*.py")) if (SRC / part).is_dir() else [SRC / f"{part}.py"]


def test_every_part_has_a_layer():
    declared = [part for row in anomalens.LAYERS for part in row]
    assert sorted(declared) == _parts() and len(declared) == len(set(declared))


@pytest.mark.parametrize("part", [part for row in anomalens.LAYERS for part in row])
def test_parts_import_only_downwards(part):
    rank = {name: number for number, row in enumerate(anomalens.LAYERS) for name in row}
    for path in _files(part):
        for name in _imports(path):
            target = name.split(".")[1]
            assert rank[target] <= rank[part], f"{path.relative_to(SRC)} imports {name} from a higher layer"


def test_no_import_cycles_between_parts():
    """Follows from the layers; stated on its own so a cycle is reported by name (a depth-first search)."""
    graph = {part: {name.split(".")[1] for path in _files(part) for name in _imports(path)} - {part}
             for part in _parts()}  # fmt: skip
    state: dict[str, str] = {}

    def visit(part: str, trail: list[str]) -> None:
        state[part] = "open"
        for target in sorted(graph[part]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*trail, part, target])}"
            if target not in state:
                visit(target, [*trail, part])
        state[part] = "done"

    for part in _parts():
        if part not in state:
            visit(part, [])


def test_the_registry_does_not_import_the_detector():
    assert not any(name.startswith("anomalens.detector") for name in _imports(SRC / "registry.py"))
