"""How good an SAE is: the evaluate stage's metrics, the paper's table and SAEs to compare with, and verify."""
