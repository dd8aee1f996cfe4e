"""The report's diagnosis rules, on curves and results built to show each problem."""

from forgeml.reporting.diagnosis import diagnose
from forgeml.reporting.html import Run, render


def curve(split: str, losses: list[float], every: int = 10) -> list[dict]:
    return [{"split": split, "step": every * (i + 1), "loss": loss} for i, loss in enumerate(losses)]


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def test_rising_validation_loss_with_falling_training_loss_is_over_fitting():
    metrics = curve("train", [2.0, 1.2, 0.8, 0.5, 0.3, 0.2]) + curve("val", [1.5, 1.0, 0.9, 1.1, 1.3, 1.5])
    findings = diagnose(metrics, {"stopped_early": True, "steps": 60, "best_step": 30}, None, None)
    assert kinds(findings) == ["over-fitting"]
    text = findings[0].text
    assert "from 0.900 at step 30 to 1.500 at step 60" in text and "kept the weights of step 30" in text
    assert "weight_decay" in text and findings[0].section == "Training" and findings[0].evidence == "loss curves"
    late = diagnose(metrics, {"stopped_early": False}, None, None)[0].text
    assert "Early stopping did not act" in late


def test_a_flat_training_loss_is_under_fitting_and_a_falling_validation_loss_asks_for_more_steps():
    flat = curve("train", [2.48, 2.47, 2.46, 2.45])
    assert kinds(diagnose(flat, {}, None, None)) == ["under-fitting"]
    improving = curve("train", [2.0, 1.0, 0.6, 0.4]) + curve("val", [1.8, 1.2, 0.9, 0.8])
    assert kinds(diagnose(improving, {}, None, None)) == ["still-improving"]
    healthy = curve("train", [2.0, 1.0, 0.6, 0.5]) + curve("val", [1.8, 0.9, 0.8, 0.8])
    assert diagnose(healthy, {}, None, None) == []


def evaluation(f1: dict[str, float], matrix: list[list[int]]) -> dict:
    labels = list(f1)
    per_class = {label: {"f1": value, "support": 10} for label, value in f1.items()}
    macro = sum(f1.values()) / len(f1)
    return {"test": {"macro_f1": macro, "per_class": per_class, "labels": labels, "confusion_matrix": matrix}}


def test_failing_classes_are_told_apart_by_how_rare_they_are():
    ev = evaluation({"a": 0.95, "b": 0.9, "c": 0.3, "d": 0.4}, [[9, 1, 0, 0], [0, 9, 1, 0], [0, 1, 3, 6], [0, 0, 6, 4]])
    manifest = {"class_counts": {"train": {"a": 400, "b": 380, "c": 20, "d": 390}}}
    findings = diagnose([], ev, manifest, None)
    assert kinds(findings) == ["rare-class", "weak-class"]
    assert "Class c fails" in findings[0].text and "20 training rows" in findings[0].text
    assert "Class d is weak" in findings[1].text and "predicted as c" in findings[1].text


def test_only_audit_warnings_prepare_left_in_the_data_are_listed(tmp_path):
    """Leaks dropped, missing values imputed, duplicates and their label conflicts removed: prepare
    records each in the manifest under the audit check it answers, and the diagnosis reads that."""
    import json

    import numpy as np
    import pandas as pd

    from forgeml.audit.stage import Audit
    from forgeml.data.prepare import prepare
    from forgeml.recipe import validate_recipe
    from forgeml.rundir import RunDir

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=200), "y": rng.normal(10, 2, size=200)})
    frame["label"] = np.where(frame["x"] > 0, "up", "down")
    frame.loc[[3, 7, 11], "y"] = np.nan  # imputed
    twins = frame.iloc[[20, 21]].assign(label=lambda f: np.where(f["label"] == "up", "down", "up"))
    frame = pd.concat([frame, twins], ignore_index=True)  # equal features, other labels: conflicts
    test = pd.concat([frame.iloc[[40, 41]], frame.iloc[:30].assign(x=lambda f: f["x"] + 5)])  # 2 leaked rows
    frame.to_csv(tmp_path / "train.csv", index=False)
    test.dropna().to_csv(tmp_path / "test.csv", index=False)
    recipe = validate_recipe(
        {
            "data": {
                "source": str(tmp_path / "train.csv"),
                "test_source": str(tmp_path / "test.csv"),
                "label_column": "label",
            },
            "model": {"name": "mlp", "hidden_sizes": [4]},
            "prepare": {"deduplicate": "near", "drop_leaked": True, "impute": "median"},
            "train": {"max_steps": 1},
        }
    )
    run = RunDir(tmp_path / "run")
    report = Audit().run(recipe, run).report
    prepare(recipe, run)
    manifest = json.loads((run.path / "data" / "manifest.json").read_text())
    warned = {name for name, check in report["checks"].items() if check["status"] != "pass"}
    acted = {(a["check"], a["action"], a["rows"]) for a in manifest["actions"]}
    assert {"leakage", "missing_fraction", "duplicate_fraction", "label_conflicts"} <= warned
    assert {
        ("leakage", "dropped", 2),
        ("missing_fraction", "imputed", 3),
        ("duplicate_fraction", "deduplicated", 2),
        ("label_conflicts", "deduplicated", 2),
    } <= acted
    listed = " ".join(f.text for f in diagnose([], {}, manifest, report))
    for handled in ("leakage", "missing_fraction", "duplicate_fraction", "label_conflicts"):
        assert f"audit's {handled} check" not in listed
    for left in warned - {a[0] for a in acted}:
        assert f"audit's {left} check" in listed and "still in the prepared data" in listed


def test_exact_deduplication_leaves_the_near_duplicates_warning_in_the_diagnosis():
    report = {"checks": {"duplicate_fraction": {"status": "warn", "note": "9 rows repeat (4 exact, 5 near)"}},
              "near_duplicates": [[3, 8]]}  # fmt: skip
    exact = {"actions": [{"check": "duplicate_fraction", "action": "deduplicated", "rows": 4, "mode": "exact"}]}
    near = {"actions": [{"check": "duplicate_fraction", "action": "deduplicated", "rows": 9, "mode": "near"}]}
    assert "audit's duplicate_fraction check" in " ".join(f.text for f in diagnose([], {}, exact, report))
    assert not diagnose([], {}, near, report)


def test_the_report_opens_with_the_diagnosis_linking_its_evidence():
    metrics = curve("train", [2.0, 1.2, 0.8, 0.5, 0.3, 0.2]) + curve("val", [1.5, 1.0, 0.9, 1.1, 1.3, 1.5])
    run = Run(name="r", recipe=None, stages={}, manifest=None, metrics=metrics, eval={"stopped_early": False})
    page = render(run)
    assert page.index('<section id="diagnosis">') < page.index('<section id="recipe">')
    assert '<a href="#training">Training: loss curves</a>' in page and '<section id="training">' in page
    empty = render(Run(name="r", recipe=None, stages={}, manifest=None, metrics=[], eval=None))
    assert "Nothing stands out in the audit." in empty
