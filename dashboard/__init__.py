"""The live dashboard: one page that shows a running TW-LB cluster (`twlb dashboard`)."""
