"""What an SAE's features do: attribution, family tags, the dashboards stage, its pages and people's ratings."""
