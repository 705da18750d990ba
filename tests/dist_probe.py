"""Run a domain script with every torch.distributed collective recorded (tests/test_scale.py).

    torchrun --nproc_per_node=2 tests/dist_probe.py OUT_PREFIX script.py [args ...]

Each rank writes OUT_PREFIX<rank>.json: one entry per collective call with the devices of the
tensors it got and the script function that called it (the first frame outside torch)."""
import atexit
import inspect
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
       "broadcast_object_list", "barrier", "reduce", "gather", "gather_object", "scatter",
       "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all")
calls = []


def tensors_in(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors_in(v)


def recorded(name, fn):
    def call(*args, **kw):
        frame = inspect.currentframe().f_back
        while frame is not None and os.sep + "torch" + os.sep in frame.f_code.co_filename:
            frame = frame.f_back
        calls.append(dict(op=name, devices=sorted({str(t.device) for t in
                                                   tensors_in([*args, *kw.values()])}),
                          caller=frame.f_code.co_name if frame else "?",
                          file=os.path.basename(frame.f_code.co_filename) if frame else "?"))
        return fn(*args, **kw)
    return call


def main():
    prefix, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    for name in OPS:
        if hasattr(dist, name):
            setattr(dist, name, recorded(name, getattr(dist, name)))
    atexit.register(lambda: json.dump(calls, open(f"{prefix}{os.environ['RANK']}.json", "w")))
    sys.path.insert(0, ROOT)
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


if __name__ == "__main__":
    main()
