"""
bench/distill.py: does a small model learn more from a bigger one's distributions than from the data alone?
White-box distillation measured: a student half as wide as config/cpu_demo.py trained on the same data, windows,
steps and schedule, once on the data's next tokens alone (cross-entropy) and once with the cpu_demo model as its
teacher (objective = "distill"). The score is validation bits per byte of the student.

    python bench/distill.py                            # pretrains config/cpu_demo.py first (about 10 minutes)
    python bench/distill.py --teacher out/cpu_demo     # or distills from a cpu_demo run already there

Every run is config/distill_cpu_demo.py with the row's objective settings, on the teacher's own training data.
"""

import argparse
import json
import os
import sys
import time

from sft import cpu_demo_run, records, run, tokens_per_s

# (row, out_dir's name, train.py arguments beside config/distill_cpu_demo.py)
ROWS = [
    ("cross-entropy alone", "student_ce", ["--objective=lm", "--teacher="]),
    ("distilled, alpha 0.5, T 1", "student_t1", ["--distill_temperature=1.0"]),
]


def last_eval(out_dir: str) -> dict:
    return records(out_dir, "val_bpb")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="a cpu_demo out_dir (default: pretrain one in --work_dir)")
    parser.add_argument("--work_dir", default="out/bench_distill", help="where data and checkpoints go")
    args = parser.parse_args()
    t0 = time.time()
    teacher = cpu_demo_run(args.teacher, args.work_dir, "--teacher")
    with open(os.path.join(teacher, "config.json")) as f:
        data_dir = json.load(f)["data_dir"]
    table = ["| student (4 x 128) | val bits per byte | val loss | training | tokens/s |", "|---|---|---|---|---|"]
    for row, name, extra in ROWS:
        out_dir = os.path.join(args.work_dir, name)
        run([sys.executable, "train.py", "config/distill_cpu_demo.py", f"--teacher={teacher}", f"--data_dir={data_dir}",
             f"--out_dir={out_dir}", "--overwrite=True", *extra])
        r = last_eval(out_dir)
        table.append(f"| {row} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | {r['elapsed_s'] / 60:.1f} min | "
                     f"{tokens_per_s(out_dir):,.0f} |")
        print("\n".join(table), flush=True)
    r = last_eval(teacher)
    print(f"\nteacher {teacher}: val {r['val_bpb']:.4f} bits per byte; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
