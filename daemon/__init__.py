"""The dallm daemon: store, scheduler, worker supervision, sockets (`dallm-daemon`)."""
