"""Explanations of a trained classifier (``forgeml explain``): token attributions for text, SHAP and
LIME for tables, a surrogate tree, and the deletion test that scores each method's faithfulness."""
