"""Privacy audits (issue 7): measure the guarantee instead of assuming it.

- :mod:`.lower_bound` — one-run ε lower bound (Steinke, Nasr, Jagielski 2023)
- :mod:`.canary` — black-box input canaries and white-box Dirac gradient canaries (how to inject)
- :mod:`.dp_sgd` — end-to-end white-box audit of Opacus DP-SGD on a tiny centralized model
- :mod:`.membership` — loss-threshold and calibrated (offline LiRA) membership inference
- :mod:`.inversion` — DLG / Inverting Gradients against one update; PSNR vs a flat image
- :mod:`.report` — audit.json, audit.md, plots, a verdict per check
"""
