"""The shape of the code base, measured the same way before and after a redesign (architecture round two).

Writes one JSON file with:

- ``module_tree``: every module under ``src/anomalens`` with its line count;
- ``long_functions``: library functions over 60 lines (from the AST), and whether a reason is written beside
  them (a comment ``# over 60 lines: ...`` on the ``def`` line or the line above);
- ``import_cycles``: cycles between top-level modules and packages (every import that runs, function-level ones
  included: a lazy import still ties two parts together; ``if TYPE_CHECKING:`` imports left out), as strongly
  connected components of the import graph;
- ``upward_imports``: imports that run against the layer order, when the code declares one
  (``anomalens.LAYERS``);
- ``threshold_files``: files that write threshold state (an assignment to a threshold attribute, or of the whole
  calibration object) or state a threshold rule (the label rule ``score > threshold``, rule and calibration names,
  the fold loop), counted apart;
- ``help_import``: ``python -X importtime -m anomalens --help`` (``-m anomalens.cli`` where the package has no
  ``__main__``): its wall time over runs (median, min, max), whether torch was imported, and the top entries
  by cumulative import time;
- ``readme_lines``.

Usage: ``python benchmarks/architecture.py --out benchmarks/results/architecture-round2-after.json``; with
``--before FILE`` (an earlier record) it also writes a side-by-side Markdown table beside ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "anomalens"
LIMIT = 60
REASON = re.compile(r"#\s*over 60 lines:")
THRESHOLD_WRITES = re.compile(  # an assignment statement whose target (or one of its targets) is such an attribute
    r"^[ \t]*(?:[\w.]+\s*,\s*)*[\w.]+\.(threshold|threshold_source|pixel_threshold|held_out_scores|"
    r"threshold_calibration|map_scale|calibration)\s*(?:,\s*[\w.]+\s*)*=(?!=)",
    re.MULTILINE,
)
THRESHOLD_RULES = re.compile(
    r"score\s*>\s*\S*threshold|THRESHOLD_RULES\s*=|CALIBRATIONS\s*=|LOO_LIMIT\s*=|def (plan_thresholds|"
    r"parse_threshold|resolve_threshold_source|fit_and_threshold|held_out_plan|_fit_with_plan|threshold_from)\b|"
    r"for fold in \S*folds"
)


def module_tree() -> dict[str, int]:
    return {str(path.relative_to(SRC.parent)): len(path.read_text().splitlines()) for path in sorted(SRC.rglob("*.py"))}


def long_functions() -> list[dict]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        length = child.end_lineno - child.lineno + 1
                        if length > LIMIT:
                            start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                            nearby = " ".join(lines[max(0, start - 2) : child.lineno])
                            found.append({"function": f"{path.relative_to(SRC.parent)}:{name}", "lines": length,
                                          "reason_written": bool(REASON.search(nearby))})  # fmt: skip
                    stack.append((child, f"{name}."))
                else:
                    stack.append((child, prefix))
    return sorted(found, key=lambda item: -item["lines"])


def _unit(module: str) -> str | None:
    """The top-level module or package a module name belongs to (``anomalens.engines.serve`` -> ``engines``)."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "anomalens" else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        unit = _unit(module)
        if unit is None:
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges = graph.setdefault(unit, set())
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # type-checking-only imports never run: left out, as the layer test does
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
                if node.module in (None, "anomalens") or names == ["anomalens"]:  # from anomalens import x
                    names = [f"anomalens.{alias.name}" for alias in node.names]
            for name in names:
                target = _unit(name)
                if target and target != unit and ((SRC / target).is_dir() or (SRC / f"{target}.py").is_file()):
                    edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(result)


def upward_imports(graph: dict[str, set[str]]) -> list[str] | None:
    sys.path.insert(0, str(SRC.parent))
    import anomalens

    layers = getattr(anomalens, "LAYERS", None)
    if layers is None:
        return None
    rank = {unit: number for number, group in enumerate(layers) for unit in group}
    return sorted(f"{unit} -> {target}" for unit, targets in graph.items() for target in targets
                  if unit in rank and target in rank and rank[target] > rank[unit])  # fmt: skip


def threshold_files() -> dict[str, dict[str, int]]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        writes, rules = len(THRESHOLD_WRITES.findall(text)), len(THRESHOLD_RULES.findall(text))
        if writes or rules:
            found[str(path.relative_to(SRC.parent))] = {"state_writes": writes, "rule_sites": rules}
    return found


def help_import(runs: int) -> dict:
    entry = "anomalens" if (SRC / "__main__.py").exists() else "anomalens.cli"
    command = [sys.executable, "-X", "importtime", "-m", entry, "--help"]
    walls, stderr = [], ""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}  # this checkout's code, whatever is installed
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
        walls.append(time.perf_counter() - began)
        stderr = done.stderr
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append({"module": match.group(4), "cumulative_ms": int(match.group(2)) / 1000,
                         "depth": len(match.group(3)) // 2})  # fmt: skip
    top_level = sorted((row for row in rows if row["depth"] == 0), key=lambda row: -row["cumulative_ms"])
    modules = {row["module"] for row in rows}
    return {
        "command": " ".join(["python", "-X", "importtime", "-m", entry, "--help"]),
        "wall_seconds": {"median": statistics.median(walls), "min": min(walls), "max": max(walls), "runs": runs},
        "imports_torch": "torch" in modules,
        "training_modules": sorted(name for name in modules if name.endswith(".training")),
        "modules_imported": len(modules),
        "top_cumulative": top_level[:12],
    }


def comparison(before: dict, after: dict) -> str:
    """The two records side by side, in Markdown."""
    def files(record: dict, kind: str) -> str:
        return ", ".join(name.removeprefix("anomalens/") for name, row in record["threshold_files"].items()
                         if row[kind]) or "none"  # fmt: skip

    def cycles(record: dict) -> str:
        return "; ".join(" <-> ".join(cycle) for cycle in record["import_cycles"]) or "none"

    def longest(record: dict) -> str:
        return ", ".join(f"{item['function'].removeprefix('anomalens/')} ({item['lines']})"
                         for item in record["long_functions"]) or "none"  # fmt: skip

    def top(record: dict) -> str:
        return ", ".join(f"{row['module']} {row['cumulative_ms']:.0f} ms" for row in record["help_import"]
                         ["top_cumulative"][:5])  # fmt: skip

    rows = [
        ("commit", before["commit"], after["commit"]),
        ("library lines (modules)", f"{before['total_lines']} ({len(before['module_tree'])})",
         f"{after['total_lines']} ({len(after['module_tree'])})"),
        ("functions over 60 lines", longest(before), longest(after)),
        ("import cycles between top-level parts", cycles(before), cycles(after)),
        ("upward imports (declared layers)", str(before["upward_imports"]), str(after["upward_imports"])),
        ("files that write threshold state", files(before, "state_writes"), files(after, "state_writes")),
        ("files that state a threshold rule", files(before, "rule_sites"), files(after, "rule_sites")),
        ("`--help` wall time, median of runs", f"{before['help_import']['wall_seconds']['median']:.2f} s",
         f"{after['help_import']['wall_seconds']['median']:.2f} s"),
        ("`--help` imports torch / training modules",
         f"{before['help_import']['imports_torch']} / {before['help_import']['training_modules']}",
         f"{after['help_import']['imports_torch']} / {after['help_import']['training_modules']}"),
        ("`--help` top imports (cumulative)", top(before), top(after)),
        ("README lines", str(before["readme_lines"]), str(after["readme_lines"])),
    ]  # fmt: skip
    lines = ["| | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {old} | {new} |" for name, old, new in rows]
    modules = sorted(set(before["module_tree"]) | set(after["module_tree"]))
    lines += ["", "| module | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {before['module_tree'].get(name, '')} | {after['module_tree'].get(name, '')} |"
              for name in modules]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--runs", type=int, default=5, help="runs of the --help timing")
    parser.add_argument("--before", default=None, help="an earlier record: also write the two side by side (.md)")
    args = parser.parse_args()
    graph = import_graph()
    result = {
        "command": "python benchmarks/architecture.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},  # fmt: skip
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT, check=False).stdout.strip(),  # fmt: skip
        "module_tree": module_tree(),
        "total_lines": sum(module_tree().values()),
        "long_functions": long_functions(),
        "import_graph": {unit: sorted(targets) for unit, targets in sorted(graph.items())},
        "import_cycles": cycles(graph),
        "upward_imports": upward_imports(graph),
        "threshold_files": threshold_files(),
        "help_import": help_import(args.runs),
        "readme_lines": len((ROOT / "README.md").read_text().splitlines()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.before:
        before = json.loads(Path(args.before).read_text())
        header = f"# Before and after\n\n`{result['command']}`\n\n"
        out.with_suffix(".md").write_text(header + comparison(before, result))
    print(json.dumps({key: result[key] for key in ("total_lines", "import_cycles", "upward_imports", "readme_lines")},
                     indent=1))  # fmt: skip
    print("long functions:", [(item["function"], item["lines"]) for item in result["long_functions"]])
    files = result["threshold_files"]
    print("threshold state written in:", [name for name, row in files.items() if row["state_writes"]])
    print("threshold rules stated in:", [name for name, row in files.items() if row["rule_sites"]])
    print("help:", result["help_import"]["wall_seconds"], "torch:", result["help_import"]["imports_torch"])


if __name__ == "__main__":
    main()
