"""Imported by the fork server of job processes alone (`tasks.JOB_PROCESSES` preload), for its side effect: the
fork server ignores SIGTERM.

A SIGTERM to the worker's process group (`docker stop`, Kubernetes, `kill -TERM -<pgid>`) reaches the fork server
too. Were it to die, the worker would read its job process as ended (the server relays the exit status) while the
job is still writing its checkpoint, and exit under it. Job processes inherit the ignore until `runner.job_process`
installs its own handler; the server itself ends when the worker does (it watches a pipe from the worker).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
