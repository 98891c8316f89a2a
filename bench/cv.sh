#!/bin/sh
# bench/cv.sh - K-fold cross-validation (stratified by class) of mtlz-retrain
# on the shipped SDSS DR18 atlas (768 real spectra, docs/labels.md), with
# `mtlz eval --bootstrap` confidence intervals per fold and a pooled summary.
# docs/results.md has the results and the exact commands.
#
#   bench/cv.sh folds   OUT [K] [SEED]       # OUT/folds/k{i}/{train,test}: archives
#   bench/cv.sh run     OUT NAME [RETRAIN_OPTION...]   # train + evaluate every fold
#   bench/cv.sh summary OUT [NAME...]        # OUT/summary.md and OUT/summary.json
#
# folds: the atlas's JSON lines are split into K folds (default 5), stratified
# by the class mtlz import gives them (Table 1 on bpt_class: -1 passive,
# 1 and 2 star-forming, 3 composite, 4 and 5 AGN), shuffled with SEED
# (default 1; Python's random.Random, so the folds are reproducible); fold i's
# records are the test archive k{i}/test, the others the training archive
# k{i}/train, both made by `mtlz import` exactly as data/sdss-atlas/make-archive.sh
# makes the shipped archive.
# run: for every fold, `mtlz-retrain --data k{i}/train --split-train 0.8
# --split-validation 0.2` (no internal test split: the fold is the test set;
# the validation split drives ReduceLROnPlateau) plus the options given (e.g.
# --epochs 50 --threads 1 --init synth.safetensors), then `mtlz eval
# --bootstrap $BOOT (default 1000) --report` on k{i}/test. Results go to
# OUT/NAME/k{i}/ (model, training log, metrics.json, report.md, wall times).
# summary (of the runs NAME..., default all): per fold and pooled over the folds (accuracy from the summed
# confusion matrices with a percentile bootstrap over the pooled test spectra;
# metallicity SD and bias pooled exactly from the per-fold n, bias and SD).
#
# Environment: BUILD (default build/) for the mtlz and mtlz-retrain binaries,
# or MTLZ / MTLZ_RETRAIN; BOOT; EVAL_THREADS (default 1); NICE (default 10).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$here/..
BUILD=${BUILD:-$src/build}
MTLZ=${MTLZ:-$BUILD/tools/mtlz}
MTLZ_RETRAIN=${MTLZ_RETRAIN:-$BUILD/tools/mtlz-retrain}
BOOT=${BOOT:-1000}
EVAL_THREADS=${EVAL_THREADS:-1}
NICE=${NICE:-10}
atlas=$src/data/sdss-atlas/sdss_dr18_atlas.jsonl.gz

usage() {
	sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

now() { date +%s.%N; }

cmd=${1:-}
[ $# -ge 2 ] || usage
out=$2
shift 2

case $cmd in
folds)
	k=${1:-5}
	seed=${2:-1}
	mkdir -p "$out/folds"
	python3 - "$atlas" "$out/folds" "$k" "$seed" <<'EOF'
import gzip, json, random, sys
atlas, dest, k, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
table1 = {-1: "passive", 1: "star_forming", 2: "star_forming", 3: "composite",
          4: "agn", 5: "agn"}
lines = gzip.open(atlas, "rt").read().splitlines()
by_class = {}
for i, line in enumerate(lines):
    c = table1.get(json.loads(line).get("bpt_class"), "none")
    by_class.setdefault(c, []).append(i)
rng = random.Random(seed)
fold = [0] * len(lines)
for c in sorted(by_class):
    idx = by_class[c]
    rng.shuffle(idx)
    for j, i in enumerate(idx):
        fold[i] = j % k
with open(f"{dest}/folds.tsv", "w") as f:
    f.write("line\tspec_obj_id\tclass\tfold\n")
    for i, line in enumerate(lines):
        r = json.loads(line)
        c = table1.get(r.get("bpt_class"), "none")
        f.write(f"{i + 1}\t{r.get('spec_obj_id')}\t{c}\t{fold[i]}\n")
for f_ in range(k):
    with gzip.open(f"{dest}/k{f_}-test.jsonl.gz", "wt") as te, \
         gzip.open(f"{dest}/k{f_}-train.jsonl.gz", "wt") as tr:
        for i, line in enumerate(lines):
            (te if fold[i] == f_ else tr).write(line + "\n")
    counts = {c: sum(1 for i in by_class[c] if fold[i] == f_) for c in sorted(by_class)}
    print(f"fold {f_}: test {sum(counts.values())} {counts}", file=sys.stderr)
EOF
	i=0
	while [ $i -lt "$k" ]; do
		for part in train test; do
			rm -rf "$out/folds/k$i/$part"
			mkdir -p "$out/folds/k$i"
			"$MTLZ" import -o "$out/folds/k$i/$part" \
				--source "galaxy-line-atlas (SDSS DR18 spectra, MPA-JHU labels)" \
				--source-version DR18 --metallicity o3n2 \
				"$out/folds/k$i-$part.jsonl.gz" 2>"$out/folds/k$i/$part.import.log"
			tail -n 1 "$out/folds/k$i/$part.import.log" >&2
		done
		i=$((i + 1))
	done
	echo "$k" >"$out/folds/K"
	;;
run)
	[ $# -ge 1 ] || usage
	name=$1
	shift
	k=$(cat "$out/folds/K")
	i=0
	while [ $i -lt "$k" ]; do
		d=$out/$name/k$i
		mkdir -p "$d"
		if [ ! -s "$d/model.safetensors" ]; then
			t0=$(now)
			nice -n "$NICE" "$MTLZ_RETRAIN" --data "$out/folds/k$i/train" \
				-o "$d/model.safetensors" --split-train 0.8 --split-validation 0.2 \
				"$@" >"$d/retrain.log" 2>&1
			t1=$(now)
			echo "retrain $(awk "BEGIN{print $t1 - $t0}") s" >"$d/wall.txt"
			echo "retrain $*" >"$d/command.txt"
		fi
		t0=$(now)
		nice -n "$NICE" "$MTLZ" eval --model "$d/model.safetensors" \
			--data "$out/folds/k$i/test" --bootstrap "$BOOT" --threads "$EVAL_THREADS" \
			--report "$d/eval" >"$d/eval.json" 2>"$d/eval.log"
		t1=$(now)
		echo "eval $(awk "BEGIN{print $t1 - $t0}") s" >>"$d/wall.txt"
		echo "$name k$i: $(tail -n 1 "$d/eval.log")" >&2
		i=$((i + 1))
	done
	;;
summary)
	python3 - "$out" "$@" <<'EOF'
import glob, json, math, os, random, sys
out = sys.argv[1]
k = int(open(f"{out}/folds/K").read())
rows, summary = [], {}
names = sys.argv[2:] or sorted(d for d in os.listdir(out)
                               if os.path.isfile(f"{out}/{d}/k0/eval.json"))
md = ["| model | fold | n | accuracy [95 % CI] | n (O/H) | SD dex [95 % CI] | bias dex | train s |",
      "|---|---|---|---|---|---|---|---|"]
for name in names:
    folds = []
    for i in range(k):
        p = f"{out}/{name}/k{i}/eval.json"
        if not os.path.isfile(p):
            continue
        j = json.load(open(p))
        wall = dict(l.split()[:2] for l in open(f"{out}/{name}/k{i}/wall.txt"))
        folds.append({"fold": i, "n": j["n"], "accuracy": j["accuracy"],
                      "accuracy_ci": j.get("accuracy_ci"),
                      "correct": sum(j["confusion"][c][c] for c in range(4)),
                      "oh_n": j["oh"]["n"], "oh_sd": j["oh"]["sd"],
                      "oh_sd_ci": j["oh"].get("sd_ci"), "oh_bias": j["oh"]["bias"],
                      "retrain_s": float(wall.get("retrain", "nan"))})
    for f in folds:
        md.append(f"| {name} | {f['fold']} | {f['n']} | {f['accuracy']:.3f} "
                  f"[{f['accuracy_ci'][0]:.3f}, {f['accuracy_ci'][1]:.3f}] | {f['oh_n']} | "
                  f"{f['oh_sd']:.4f} [{f['oh_sd_ci'][0]:.4f}, {f['oh_sd_ci'][1]:.4f}] | "
                  f"{f['oh_bias']:+.4f} | {f['retrain_s']:.0f} |")
    n = sum(f["n"] for f in folds)
    correct = sum(f["correct"] for f in folds)
    rng = random.Random(1)
    boot = sorted(sum(rng.random() < correct / n for _ in range(n)) / n
                  for _ in range(2000))
    acc_ci = [boot[int(0.025 * 2000)], boot[int(0.975 * 2000) - 1]]
    m = sum(f["oh_n"] for f in folds)
    bias = sum(f["oh_n"] * f["oh_bias"] for f in folds) / m
    var = sum(f["oh_n"] * (f["oh_sd"] ** 2 + f["oh_bias"] ** 2) for f in folds) / m - bias ** 2
    accs = [f["accuracy"] for f in folds]
    sds = [f["oh_sd"] for f in folds]
    def msd(v):
        mu = sum(v) / len(v)
        return mu, math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    s = {"folds": folds, "n": n, "pooled_accuracy": correct / n,
         "pooled_accuracy_ci": acc_ci, "oh_n": m, "pooled_oh_sd": math.sqrt(var),
         "pooled_oh_bias": bias, "fold_accuracy_mean_sd": msd(accs),
         "fold_oh_sd_mean_sd": msd(sds),
         "retrain_s_total": sum(f["retrain_s"] for f in folds)}
    summary[name] = s
    md.append(f"| **{name}** | pooled | {n} | **{s['pooled_accuracy']:.3f}** "
              f"[{acc_ci[0]:.3f}, {acc_ci[1]:.3f}] | {m} | **{s['pooled_oh_sd']:.4f}** "
              f"(folds {s['fold_oh_sd_mean_sd'][0]:.4f} ± {s['fold_oh_sd_mean_sd'][1]:.4f}) | "
              f"{bias:+.4f} | {s['retrain_s_total']:.0f} |")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
	;;
*)
	usage
	;;
esac
