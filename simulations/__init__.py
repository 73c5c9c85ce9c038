"""Local simulation of many hospitals on one machine (Flower's Ray engine), and audits."""
