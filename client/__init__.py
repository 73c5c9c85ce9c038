"""Everything that runs inside a hospital: data loading, local training, the ClientApp."""
