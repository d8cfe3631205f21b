"""Per source line of a kernel: executed warp instructions and sampled warp stalls, from an Nsight Compute report.

Run where ncu is installed (its Python module ships with it), on a report made with `--set full` (or with the
SourceCounters section) of a build with `-lineinfo`:
    python3 benchmarks/ncu_lines.py report.ncu-rep [--top 40]
"""

import argparse
import collections
import glob
import sys


def load_ncu_report_module():
    for path in sorted(glob.glob("/opt/nvidia/nsight-compute/*/extras/python")) + sorted(
        glob.glob("/usr/local/cuda*/nsight-compute*/extras/python")
    ):
        sys.path.append(path)
    import ncu_report  # noqa: PLC0415 (only importable after the path above)

    return ncu_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    ncu_report = load_ncu_report_module()
    report_range = ncu_report.load_report(args.report).range_by_idx(0)
    for index in range(report_range.num_actions()):
        show(report_range.action_by_idx(index), args.top)


# the kernel's headline figures, printed where the report has them
SUMMARY_METRICS = (
    "gpu__time_duration.sum",
    "launch__registers_per_thread",
    "sm__maximum_warps_per_active_cycle_pct",  # theoretical occupancy
    "sm__warps_active.avg.pct_of_peak_sustained_active",  # achieved occupancy
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum",
    "smsp__inst_executed.sum",
)


def show(action, top):
    print("kernel:", action.name())  # noqa: T201
    for name in SUMMARY_METRICS:
        metric = action.metric_by_name(name)
        if metric is not None:
            print(f"  {name:52s} {metric.as_double():14.2f} {metric.unit()}")  # noqa: T201
    per_pc = {}
    for name in ("inst_executed", "smsp__pcsamp_sample_count"):
        metric = action.metric_by_name(name)
        if metric is None or metric.num_instances() == 0:
            print("no per-instruction metric", name)  # noqa: T201
            continue
        pcs = metric.correlation_ids()
        per_pc[name] = {pcs.as_uint64(i): metric.as_uint64(i) for i in range(metric.num_instances())}
    lines = collections.defaultdict(lambda: collections.Counter())
    opcodes = collections.defaultdict(collections.Counter)
    for name, values in per_pc.items():
        for pc, value in values.items():
            info = action.source_info(pc)
            where = f"{info.file_name().split('/')[-1]}:{info.line()}" if info is not None else "?"
            lines[where][name] += value
            if name == "inst_executed":
                # the opcode: the first word that is not a predicate guard (@P0, @!P1)
                words = [word for word in (action.sass_by_pc(pc) or "?").split() if not word.startswith("@")]
                opcodes[words[0] if words else "?"]["inst_executed"] += value
    totals = {name: sum(values.values()) for name, values in per_pc.items()}
    print("totals:", totals)  # noqa: T201
    key = "inst_executed"
    for where, counts in sorted(lines.items(), key=lambda kv: -kv[1][key])[:top]:
        shares = "  ".join(f"{n.split('__')[-1]} {100 * counts[n] / max(totals[n], 1):5.1f}%" for n in per_pc)
        print(f"{where:32s} {shares}")  # noqa: T201
    print("opcodes:")  # noqa: T201
    for op, counts in sorted(opcodes.items(), key=lambda kv: -kv[1]["inst_executed"])[:25]:
        print(f"  {op:16s} {100 * counts['inst_executed'] / max(totals['inst_executed'], 1):5.1f}%")  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
