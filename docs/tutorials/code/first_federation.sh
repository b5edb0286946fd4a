# The commands of docs/tutorials/first-federation.md, run by tests/test_tutorials.py.

# --8<-- [start:simulate]
brokerfl simulate
# --8<-- [end:simulate]

# --8<-- [start:look]
ls runs/default
head -n 1 runs/default/metrics.jsonl
# --8<-- [end:look]

# --8<-- [start:flags]
brokerfl simulate --clients 4 --rounds 5 --out runs/small
# --8<-- [end:flags]

# --8<-- [start:config]
brokerfl simulate my_run.yaml
# --8<-- [end:config]

# --8<-- [start:load]
python load_model.py
# --8<-- [end:load]
