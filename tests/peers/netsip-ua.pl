#!/usr/bin/perl
# A SIP user agent built on Net::SIP (libnet-sip-perl), driven by smsgw's black-box tests.
#
#   netsip-ua.pl register USER PASSWORD DOMAIN REGISTRAR_HOST:PORT LOCAL_HOST:PORT EXPIRES [udp|tcp]
#       Prints "REGISTER ok code=200 contacts=N" or "REGISTER failed code=NNN"; exits 0 or 1.
#   netsip-ua.pl reglisten USER PASSWORD DOMAIN REGISTRAR_HOST:PORT LOCAL_HOST:PORT SECONDS CODE [udp|tcp]
#       Registers, then answers every MESSAGE with CODE for SECONDS, printing
#       "MESSAGE from=<From> to=<To> ct=<Content-Type> body=<body, newlines as \n>" for each.
#   netsip-ua.pl listen LOCAL_HOST:PORT SECONDS CODE [udp|tcp]
#       The same without registering (a PBX trunk peer); prints "LISTENING" once bound.
use strict;
use warnings;
use Net::SIP;
use Net::SIP::Debug;
Net::SIP::Debug->level($ENV{NETSIP_DEBUG}) if $ENV{NETSIP_DEBUG};

my ($cmd, $user, $password, $domain, $registrar, $local, $expires, $proto);
my ($seconds, $answer) = (0, 200);
if (($ARGV[0] // '') eq 'listen') {
    ($cmd, $local, $seconds, $answer, $proto) = @ARGV;
    die "usage: see the comment at the top of $0\n" unless defined $answer;
} else {
    ($cmd, $user, $password, $domain, $registrar, $local, $expires, $proto) = @ARGV;
    die "usage: see the comment at the top of $0\n"
        unless defined $expires && ($cmd eq 'register' || $cmd eq 'reglisten');
    if ($cmd eq 'reglisten') {
        ($seconds, $answer, $proto) = ($expires, $proto, $ARGV[8]);
        $expires = 300;
    }
}
$proto ||= 'udp';
$| = 1;

my $leg = Net::SIP::Leg->new(addr => $local, proto => $proto)
    or die "cannot create a $proto leg on $local: $!\n";
my $ua = $cmd eq 'listen'
    ? Net::SIP::Simple->new(legs => [$leg], from => "sip:pbx\@$local")
    : Net::SIP::Simple->new(
        legs      => [$leg],
        registrar => "sip:$registrar;transport=$proto",
        from      => "sip:$user\@$domain",
        auth      => [$user, $password],
    );

if ($cmd eq 'listen') {
    print "LISTENING\n";
} else {
    my ($status, %info);
    $ua->register(
        expires  => $expires,
        cb_final => sub { ($status, %info) = @_ },
    );
    $ua->loop(10, \$status);

    my $code = $info{code} // ($info{packet} ? $info{packet}->code : 'none');
    if (($status // '') ne 'OK') {
        print "REGISTER failed code=$code\n";
        exit 1;
    }
    my @contacts = $info{packet}->get_header('contact');
    printf "REGISTER ok code=%s contacts=%d\n", $info{packet}->code, scalar @contacts;
    exit 0 if $cmd eq 'register';
}


$ua->{endpoint}->set_application(sub {
    my ($endpoint, $ctx, $request, $leg, $from) = @_;
    my $reason = $answer == 200 ? 'OK' : 'Temporarily Unavailable';
    if ($request->method eq 'MESSAGE') {
        my $body = ($request->as_parts)[3] // "";
        $body =~ s/\r?\n/\\n/g;
        printf "MESSAGE from=%s to=%s ct=%s body=%s\n",
            scalar $request->get_header('from'), scalar $request->get_header('to'),
            scalar($request->get_header('content-type')) // '', $body;
        $endpoint->new_response($ctx, $request->create_response($answer, $reason), $leg, $from);
    } else {
        $endpoint->new_response($ctx, $request->create_response(405, 'Method Not Allowed'), $leg, $from);
    }
    $endpoint->close_context($ctx);
});
$ua->loop($seconds);
exit 0;
