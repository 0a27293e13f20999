"""Run several CPT requests one after another in one torchrun launch (one process group: each launch of two CPU
processes costs seconds of interpreter and library start-up): `torchrun ... cpt_batch.py REQUESTS.json`, a JSON
list of `CPTLaunch` objects."""

import json
import sys

import torch

from langadapt.core.adaptation.train.launch import CPTLaunch, run_request

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as source:
        requests = [CPTLaunch.model_validate(item) for item in json.load(source)]
    for request in requests:
        run_request(request)
    torch.distributed.destroy_process_group()
