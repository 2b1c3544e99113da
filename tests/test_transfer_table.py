"""The transfer table's CSV round trip and ``--keep`` (rows of earlier invocations kept)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("transfer_table", ROOT / "benchmarks" / "transfer_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name, acc, size=64, epochs=2, weights="null"):
    return {"backbone": name, "accuracy": acc, "macro_f1": acc - 0.01, "glioma_recall": 0.5, "params": 11_188_164,
            "img_per_s": 557.4, "test_images": 856, "image_size": size, "epochs": epochs, "weights": weights,
            "train_s": 77, "run": f"/runs/{name}"}


def test_written_rows_read_back_with_their_numbers(tmp_path):
    tt = _module()
    rows = [_row("resnet18", 0.8306), _row("swin_tiny", 0.2547)]
    tt.write(rows, tmp_path, "note")
    assert tt.read_rows(tmp_path / "transfer_table.csv") == rows
    md = (tmp_path / "transfer_table.md").read_text()
    assert "| resnet18 | 0.831 | 0.821 | 0.500 | 11.2 M | 557.4 | 856 |" in md
    assert tt.read_rows(tmp_path / "missing.csv") == []


def test_keep_adds_other_backbones_of_the_same_settings_in_table_order():
    tt = _module()
    kept = [_row("resnet18", 0.83), _row("swin_tiny", 0.25), _row("vgg16", 0.26, size=224),
            _row("vit_b16", 0.32, weights="/w/vit.h5"), _row("resnext50", 0.10)]
    merged = tt.merge_kept(kept, [_row("resnext50", 0.84)], size=64, epochs=2, pretrained=False)
    assert [r["backbone"] for r in merged] == ["swin_tiny", "resnext50", "resnet18"]  # BACKBONES order
    assert [r["accuracy"] for r in merged if r["backbone"] == "resnext50"] == [0.84]  # the new row replaces the old
    pretrained = tt.merge_kept(kept, [], size=64, epochs=2, pretrained=True)
    assert [r["backbone"] for r in pretrained] == ["vit_b16"]
