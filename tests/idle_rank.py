"""A rank that only waits (run through launchers/local.sh -m idle_rank): the launcher's own behaviour is
under test, so the rank costs no start-up."""
import time

time.sleep(600)
