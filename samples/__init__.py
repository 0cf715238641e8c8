"""Sample Instruqt traffic shared by the tests and the benchmarks: realistic event histories
(with the CRM records they imply, computed independently of the engine) and Svix-signed
deliveries."""
