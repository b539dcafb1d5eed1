"""The live image: user code runs in a supervised child process.

- L{.supervisor} (server side) spawns the child, talks AMP to it over extra
  pipes, restarts it when it dies and turns its answers into protocol results.
- L{.child} (child side) runs the AMP responder and one worker thread per
  session.
- L{.workspace} is the in-child model (namespaces, REPL cells, binding
  serialization, registry, inspection, completion), free of threads and Twisted.
- L{.amp_commands} is the contract between the two processes.
"""
