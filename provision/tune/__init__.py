"""tune: the expert placement (--n-cpu-moe) with the most experts on the GPU that still runs the user's
real configuration, with a safety margin. Predict with llama-fit-params, verify with few real probes.

    search.py    pure decisions: estimates + probe outcomes in, next action out (unit-tested on recorded data)
    fitparams.py llama-fit-params -fitp on: argv and output parser
    (the GGUF header reader it runs on the target is provision/ggufhead.py)
    probe.py     one real llama-server run per value (probe.sh), outcome classification
    state.py     <state_dir>/tune.json: current result (read by serve), cached results, overhead constants
    report.py    probe table and PNG plot
    runner.py    the orchestration through provision.host.Host
    tasks.py     `invoke tune`;  __main__.py: `python -m provision.tune` (no Invoke needed: GPU benchmark)
"""
