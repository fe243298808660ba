"""The dashboard's views beyond the queue and the selected job, one module each: resources
(host, GPUs, jobs), compare (curves of marked jobs overlaid), logs (the worker's log, followed and
searched), details (what `dallm show` prints, with export), clone (resubmit with `--set`s), and the
queue's filter. `tui/app.py` only wires their keys and screens."""
