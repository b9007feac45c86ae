"""
The README's tables of `evaluate.py`: two stored runs (MR and BBC, same model) side by side, one row per
method (ASTRA's, scored on a few test examples only, are in the runs' own txt), from their JSON files.

    python benchmarks/evaluate_table.py benchmarks/results/evaluate_mr_cnn.json benchmarks/results/evaluate_bbc_cnn.json
    python benchmarks/evaluate_table.py benchmarks/results/evaluate_mr_minilm.json benchmarks/results/evaluate_bbc_minilm.json
"""

import argparse
import json


def table(runs):
    """The markdown lines of the table of `runs` (each a loaded JSON of evaluate.py), in the first's order."""
    names = list(dict.fromkeys(name for run in runs for name in run["methods"] if "ASTRA" not in name))
    steps = runs[0]["settings"]["further_steps"]
    k = runs[0]["top_k"]
    labels = [run["settings"]["dataset"].upper() for run in runs]
    both = " / ".join(labels)
    header = ["method"]
    for label in labels:
        header += [f"{label}: LDS", f"{label}: further training " + " / ".join(f"t={t}" if i == 0 else str(t)
                                                                              for i, t in enumerate(steps))]
    header += [f"identical class {both}", f"top-{k} cardinality {both}", f"randomisation corr. {both}",
               f"mislabel AUC {both}", f"seconds {both}"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in names:
        rows = [run["methods"].get(name, {}) for run in runs]
        cells = [name]
        for row in rows:
            lds = row.get("lds")
            cells.append("" if lds is None else f"{lds['mean']:.3f} [{lds['ci_low']:.3f}, {lds['ci_high']:.3f}]")
            further = row.get("further_training", {})
            cells.append(_pair([further.get(str(t), {}).get("mean") for t in steps], ".2f"))
        for key, spec in (("identical_class", ".2f"), (f"top_{k}_cardinality", ".2f"),
                          ("randomization_correlation", ".2f"), ("mislabel_auc", ".3f"), ("seconds", ".1f")):
            cells.append(_pair([row.get(key) for row in rows], spec))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pair(values, spec):
    """Values joined by " / ", each blank where missing; blank if all are."""
    if all(value is None for value in values):
        return ""
    return " / ".join("" if value is None else format(value, spec) for value in values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="JSON files of evaluate.py runs, the first giving the row order")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as handle:
            runs.append(json.load(handle))
    lines = table(runs)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
