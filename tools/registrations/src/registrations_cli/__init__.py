"""`registrations`: the operator's command for the registration bridge."""
