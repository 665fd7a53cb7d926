"""bfloat16 levers for the dominant networks of WinCLIP and CLIPFusion (issue 34, item 2), each measured alone.

Networks (random weights, the real sizes; the FLOPs are the trained models'):

- ``vit``: WinCLIP's image encoder, open_clip ViT-B-16-plus-240, a batch of 8 at 240 px;
- ``unet``: CLIPFusion's SD 2.1 base UNet, a batch of 8 latents 64 x 64 with 77 text states;
- ``vae``: CLIPFusion's SD VAE encoder, a batch of 2 at 512 px.

Levers (each on its own, against ``eager``: bf16 weights, inference mode, diffusers' SDPA attention, open_clip's
``nn.MultiheadAttention`` fast path):

- ``channels_last``: convolution inputs and weights in NHWC (oneDNN's preferred layout);
- ``no_mha_fastpath`` (vit): attention through separate matmuls + SDPA instead of the fused native MHA kernel;
- ``math_attention`` (unet): diffusers' classic attention (matmul, softmax, matmul) instead of SDPA;
- ``compile``: ``torch.compile`` (Inductor, C++/OpenMP codegen with oneDNN for the matmuls and convolutions);
- ``onednn_graph``: TorchScript trace + freeze with oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``).

FLOPs are counted once per network with ``FlopCounterMode`` (the MHA fast path off so that its matmuls are seen,
the CPU flash kernel counted by torch's SDPA formula). % of peak: GFLOP/s against the bf16 (and fp32) square
2048 matmul peak measured in the same process. Timing: the median of ``--repeats`` after warm-ups; levers of a
network alternate within each repeat.

    python3 benchmarks/bf16_levers.py --out benchmarks/results/bf16-levers-round3.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.backends import mha
from torch.utils.flop_counter import FlopCounterMode

from anomalens.evaluation.profiling import write_benchmark_json
from anomalens.evaluation.speed import _cpu_flash_attention_flops, matmul_peak
from anomalens.io.outputs import atomic_write_text

DTYPE = torch.bfloat16


def build_vit() -> tuple[torch.nn.Module, tuple]:
    import open_clip

    model = open_clip.create_model("ViT-B-16-plus-240", pretrained=None).visual.eval().to(DTYPE)
    return model, (torch.randn(8, 3, 240, 240, dtype=DTYPE),)


def build_unet() -> tuple[torch.nn.Module, tuple]:
    import diffusers

    from anomalens.backbones.diffusion import ARCHITECTURES

    spec = ARCHITECTURES["sd-2-1-base"]
    unet = diffusers.UNet2DConditionModel(**spec.unet).eval().to(DTYPE)
    width = spec.unet.get("cross_attention_dim", 1024)
    return unet, (torch.randn(8, 4, 64, 64, dtype=DTYPE), torch.full((8,), 500), torch.randn(8, 77, width, dtype=DTYPE))


def build_vae() -> tuple[torch.nn.Module, tuple]:
    import diffusers

    from anomalens.backbones.diffusion import ARCHITECTURES

    vae = diffusers.AutoencoderKL(**ARCHITECTURES["sd-2-1-base"].vae).eval().to(DTYPE)

    class Encoder(torch.nn.Module):  # what CLIPFusion runs of the VAE: the encoder and the posterior's mean
        def __init__(self):
            super().__init__()
            self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

        def forward(self, images):
            return self.quant_conv(self.encoder(images)).chunk(2, dim=1)[0]

    return Encoder().eval(), (torch.randn(2, 3, 512, 512, dtype=DTYPE),)


NETWORKS = {"vit": build_vit, "unet": build_unet, "vae": build_vae}


def _call(model: torch.nn.Module, inputs: tuple) -> Callable[[], object]:
    return lambda: model(*inputs)


def levers(name: str, model: torch.nn.Module, inputs: tuple) -> dict[str, Callable[[], Callable[[], object]]]:
    """Each lever as a function that prepares it (once) and returns the call to time."""

    def eager():
        return _call(model, inputs)

    def channels_last():
        moved = copy.deepcopy(model).to(memory_format=torch.channels_last)
        converted = tuple(x.to(memory_format=torch.channels_last) if x.ndim == 4 else x for x in inputs)
        return _call(moved, converted)

    def no_mha_fastpath():
        def run():
            mha.set_fastpath_enabled(False)
            try:
                return model(*inputs)
            finally:
                mha.set_fastpath_enabled(True)

        return run

    def math_attention():
        from diffusers.models.attention_processor import AttnProcessor

        classic = copy.deepcopy(model)
        classic.set_attn_processor(AttnProcessor())
        return _call(classic, inputs)

    def compile_():
        compiled = torch.compile(copy.deepcopy(model))
        return _call(compiled, inputs)

    def onednn_graph():
        torch.jit.enable_onednn_fusion(True)
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), inputs, check_trace=False, strict=False))
        return _call(traced, inputs)

    chosen = {"eager": eager}
    if name == "vit":
        chosen["no_mha_fastpath"] = no_mha_fastpath
    else:
        chosen["channels_last"] = channels_last
    if name == "unet":
        chosen["math_attention"] = math_attention
    chosen["compile"] = compile_
    if name != "unet":  # diffusers' UNet returns a dataclass, which TorchScript's trace does not take
        chosen["onednn_graph"] = onednn_graph
    return chosen


def count_flops(model: torch.nn.Module, inputs: tuple) -> float:
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_flash: _cpu_flash_attention_flops} if cpu_flash is not None else {}
    mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(*inputs)
    finally:
        mha.set_fastpath_enabled(True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/bf16-levers-round3.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    peak = {"bfloat16": matmul_peak("cpu", "bfloat16"), "float32": matmul_peak("cpu", "float32")}
    results: dict = {}
    for name in args.networks:
        torch.manual_seed(0)
        model, inputs = NETWORKS[name]()
        flops = count_flops(model, inputs)
        prepared, failures, prepare_seconds = {}, {}, {}
        for lever, prepare in levers(name, model, inputs).items():
            began = time.perf_counter()
            try:
                with torch.inference_mode():
                    call = prepare()
                    call()
                    call()  # warm-up (compiles on the first call)
                prepared[lever] = call
            except Exception as error:  # a lever the stack cannot apply: recorded, not fatal
                failures[lever] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            prepare_seconds[lever] = round(time.perf_counter() - began, 1)
        times = {lever: [] for lever in prepared}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for lever, call in prepared.items():
                    began = time.perf_counter()
                    call()
                    times[lever].append(time.perf_counter() - began)
        rows = {}
        for lever, values in times.items():
            seconds = statistics.median(values)
            rate = flops / seconds / 1e9
            rows[lever] = {"seconds": seconds, "range": [min(values), max(values)], "gflop_per_s": rate,
                           "percent_of_bf16_peak": 100 * rate / peak["bfloat16"],
                           "speedup_over_eager": statistics.median(times["eager"]) / seconds,
                           "prepare_seconds": prepare_seconds[lever]}  # fmt: skip
        results[name] = {"gflop": flops / 1e9, "inputs": [list(x.shape) for x in inputs], "levers": rows,
                         "failed": failures}  # fmt: skip
        logging.warning("%s: %s", name, {lever: round(row["percent_of_bf16_peak"], 1) for lever, row in rows.items()})
    result = write_benchmark_json(args.out, {"benchmark": "bf16 levers of the dominant networks",
                                             "matmul_peak_gflop_per_s": peak, "networks": results})  # fmt: skip
    lines = [f"# {result['benchmark']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads, torch "
             f"{result['machine']['torch']}. Matmul peak in this process: bf16 {peak['bfloat16']:.0f} GFLOP/s, fp32 "
             f"{peak['float32']:.0f} GFLOP/s (bf16 / fp32 = {peak['bfloat16'] / peak['float32']:.2f}).", "",
             "| network | GFLOP | lever | s (median) | GFLOP/s | % of bf16 peak | x eager | prepare s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, network in results.items():
        for lever, row in network["levers"].items():
            lines.append(f"| {name} | {network['gflop']:.0f} | {lever} | {row['seconds']:.3f} | "
                         f"{row['gflop_per_s']:.0f} | {row['percent_of_bf16_peak']:.1f} | "
                         f"{row['speedup_over_eager']:.2f} | {row['prepare_seconds']} |")  # fmt: skip
        for lever, reason in network["failed"].items():
            lines.append(f"| {name} | {network['gflop']:.0f} | {lever} | failed: {reason} | | | | |")
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
