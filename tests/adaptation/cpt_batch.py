"""Run several CPT requests one after another in one torchrun launch (one process group: each launch of two CPU
processes costs seconds of interpreter and library start-up): `torchrun ... cpt_batch.py RUNS.json`, a JSON list of
`{"request": CPTLaunch, "interrupt": bool}`; an interrupted run is cancelled at its first log step, then resumed."""

import json
import sys

import torch

from langadapt.core.adaptation.train.launch import CPTLaunch, run_request

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as source:
        runs = json.load(source)
    for run in runs:
        request = CPTLaunch.model_validate(run["request"])
        if run["interrupt"]:
            assert run_request(request, should_cancel=lambda: True).cancelled
            request = request.model_copy(update={"resume": True})
        run_request(request)
    torch.distributed.destroy_process_group()
