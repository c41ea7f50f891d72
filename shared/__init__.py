"""The device CA: a certificate authority for Azure IoT device fleets."""
