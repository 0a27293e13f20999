"""Training loops of language adaptation: continued pretraining (`cpt.py`) and supervised fine-tuning for
calibration (`sft.py`), with what they share in `common.py` and the corpus packing in `packing.py`."""
