"""Renamed: the fusion ablation grew into the nnY-Net study (finetune/study.py, seeds, controls, paired CIs).

    python -m finetune.ablation ...   # the same command and flags as python -m finetune.study
"""

from finetune.study import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
