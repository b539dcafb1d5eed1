"""The live image: user code runs in a supervised child process.

- :mod:`.supervisor` (server side) spawns the child, talks AMP to it over extra
  pipes, restarts it when it dies and turns its answers into protocol results.
- :mod:`.child` (child side) runs the AMP responder and one worker thread per
  session.
- :mod:`.workspace` is the in-child model (namespaces, REPL cells, binding
  serialization, registry, inspection, completion), free of threads and Twisted.
- :mod:`.amp_commands` is the contract between the two processes.
"""
