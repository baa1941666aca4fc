import json
import math

from finetune.ablation import write_table


def test_table_marks_the_best_run_and_writes_valid_json(tmp_path):
    rows = [
        {"model": "swinunetr", "fusion": "none", "mean_dice": 0.41, "miou": 0.3, "mean_hd95": math.nan,
         "dice_liver": 0.8, "dice_tumor": 0.02},
        {"model": "nnynet", "fusion": "cross_attention", "mean_dice": 0.52, "miou": 0.4, "mean_hd95": 12.5,
         "dice_liver": 0.85, "dice_tumor": 0.19},
    ]  # fmt: skip
    text = write_table(rows, tmp_path, "Budget per run: 2 steps.")
    lines = text.splitlines()
    assert lines[0] == "| model | fusion | mean Dice | mIoU | mean HD95 (mm) | liver | tumor |"
    assert lines[2] == "| swinunetr | none | 0.410 | 0.300 | n/a | 0.800 | 0.020 |"
    assert lines[3] == "| nnynet | cross_attention | **0.520** | 0.400 | 12.500 | 0.850 | 0.190 |"
    assert text.endswith("Budget per run: 2 steps.\n") and (tmp_path / "ablation.md").read_text() == text
    saved = json.loads((tmp_path / "ablation.json").read_text())  # strict JSON: NaN became null
    assert saved["runs"][0]["mean_hd95"] is None and saved["runs"][1]["dice_tumor"] == 0.19
