"""Operating the server: metrics, the offline admin tool."""
