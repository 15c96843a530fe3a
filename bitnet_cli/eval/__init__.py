"""`bitnet eval`: lm-evaluation-harness on packed files (C engine) and checkpoints (torch).

* :func:`bitnet_cli.eval.runner.evaluate` is the library entry point of the command;
* :mod:`bitnet_cli.eval.adapter` is lm-eval's model type ``bitnet`` (imported = registered);
* :mod:`bitnet_cli.eval.tasks` feeds lm-eval's own tasks from local files (``--data-dir``);
* ``python -m bitnet_cli.eval`` (or ``bitnet-lm-eval``) is lm-eval's own command line with
  ``--model bitnet`` available.

Nothing here is imported by ``bitnet_cli`` itself: lm-eval and torch load only for evaluation.
"""
